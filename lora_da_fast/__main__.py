"""``python -m lora_da_fast`` and the ``lora-da-fast`` console script (setup.py's entry point
:func:`console`): the ``lora-da-fast`` command line.

The command line imports torch, transformers and peft, which takes seconds. This module imports nothing
heavy, and an interrupt (Ctrl-C, SIGTERM) during those imports ends the process at once with one line and
exit status 130 (143): nothing is written before the run starts, and an exception raised inside the
imports could be swallowed by a library's import guard and surface later as another error. Then
:func:`lora_da_fast.cli.main` handles interrupts itself; once it returns, the process only exits, and an
interrupt then is ignored (the exit status already says what is on disk).
"""
import os
import signal
import sys
import threading

PROG = "lora-da-fast"
_STARTING = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}


def _say(line: str) -> None:
    try:
        os.write(2, (line + "\n").encode())
    except OSError:  # stderr closed or broken
        pass


def _while_starting(signum, frame):
    code, what = _STARTING[signum]
    _say(f"{PROG}: {what} while starting; nothing was written")
    os._exit(code)


def _exiting() -> None:
    """From here the process only exits: an interrupt has nothing left to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def console(argv=None) -> int:
    """Run the command line; returns its exit status."""
    ours = threading.current_thread() is threading.main_thread()
    if ours:
        for sig in _STARTING:
            signal.signal(sig, _while_starting)
    from .cli import main

    if ours:  # main handles Ctrl-C (KeyboardInterrupt) and installs its own SIGTERM handling
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = None
    try:
        code = main(argv)
    except KeyboardInterrupt:
        if code is None:  # out of main before (or outside) its own handling: its argument parsing
            _say(f"{PROG}: interrupted; no adapter was written")
            code = 130
    finally:
        if ours:
            _exiting()
    return code


if __name__ == "__main__":
    sys.exit(console())
