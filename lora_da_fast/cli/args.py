"""The command line's arguments: one parser, one-line usage errors (exit status 2)."""
from __future__ import annotations

import argparse

from ..version import __version__
from .builtins import BUILTIN_DATA, BUILTIN_MODELS, DATA_LIMIT_MB

PROG = "lora-da-fast"

POPULATION_HELP = (
    "N of the LoRA-DA objective (docs/algorithm.md): the number of examples of the fine-tuning set you will "
    "train the adapter on. It weighs the variance term (sampling noise of fine-tuning on N examples, "
    "beta * sum(u) / (N sigma^2) * Zd^-1) against the bias term: a larger N trusts the data more and "
    "moves the subspace towards the Fisher-gradient's top directions. Default: the number of examples "
    "in --data, right when --data is the fine-tuning set; give the true size otherwise (the authors "
    "used 100000).")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr and exits with status 2."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _number(kind, allow_zero: bool = False):
    """An argparse type: ``kind`` (int or float) that is finite and > 0 (>= 0 with ``allow_zero``)."""
    what = ("an integer" if kind is int else "a number") + (" >= 0" if allow_zero else "")
    what = what if allow_zero else ("a positive integer" if kind is int else "a positive finite number")

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (v > 0 or (allow_zero and v == 0)) or v == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


SEED_MAX = 2 ** 64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {SEED_MAX}, got {text!r}") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {SEED_MAX} (2**64 - 1), got {text!r}")
    return v


def _layers_per_pass(text: str):
    return "auto" if text == "auto" else _number(int)(text)


_positive_int, _positive_float, _nonneg_float = _number(int), _number(float), _number(float, allow_zero=True)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="LoRA-DA: data-aware LoRA initialisation for Hugging Face models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser("init", help="compute a LoRA-DA adapter and save it as a standard PEFT adapter",
                       description="Compute LoRA-DA factors for a model and calibration data and save them as a "
                                   "standard PEFT LoRA adapter (load it with PeftModel.from_pretrained).")
    io = p.add_argument_group("input and output")
    io.add_argument("--model", required=True, metavar="M",
                    help="a local Hugging Face model folder, or a built-in name: "
                         + "; ".join(f"{k} ({v})" for k, v in BUILTIN_MODELS.items()))
    io.add_argument("--trust-remote-code", action="store_true",
                    help="run the Python code a --model folder names in its config (auto_map); without it such a "
                         "folder is refused (never a prompt)")
    io.add_argument("--data", required=True, metavar="D",
                    help='a JSONL file with one {"text": ...} or {"prompt": ..., "response": ...} object per '
                         "line (prompt tokens are left out of the loss), or a built-in name: "
                         + "; ".join(f"{k} ({v})" for k, v in BUILTIN_DATA.items()))
    io.add_argument("--max-data-mb", type=_positive_int, default=DATA_LIMIT_MB, metavar="MB",
                    help="read at most MB MiB of a --data file: a larger file, or an endless stream, is refused "
                         "(default: %(default)s)")
    io.add_argument("--out", required=True, metavar="DIR",
                    help="output folder: adapter_config.json, adapter_model.safetensors, lora_da_report.json")
    io.add_argument("--overwrite", action="store_true",
                    help="replace the adapter in --out if it exists (its adapter_config.json, "
                         "adapter_model.safetensors/.bin and lora_da_report.json; every other file there is kept)")
    io.add_argument("--stats-cache", metavar="FILE",
                    help="statistics file: if FILE exists and was made from the same model, data and settings, "
                         "load it and skip the data pass (rerun the solve with other --rank, --beta, --gamma, "
                         "--population-size, --target-modules subsets); otherwise run the pass, checkpointing "
                         "it in FILE.partial (rerun after Ctrl-C or a crash to resume), and save FILE at the end")
    io.add_argument("--checkpoint-every", type=_positive_int, default=32, metavar="N",
                    help="with --stats-cache: checkpoint the statistics pass every N examples; each checkpoint "
                         "writes all the statistics (as large as FILE), so raise N for large models "
                         "(default: %(default)s)")
    d = p.add_argument_group("calibration data")
    d.add_argument("--num-samples", type=_positive_int, default=256, metavar="n",
                   help="calibration examples drawn from --data (a fixed random subset, seed 0, in file order; "
                        "all of them if fewer) (default: %(default)s)")
    d.add_argument("--max-length", type=_positive_int, default=1024, metavar="T",
                   help="tokens per example; longer ones are truncated (default: %(default)s)")
    d.add_argument("--batch-size", type=_positive_int, default=8, metavar="B",
                   help="examples per forward/backward; the result does not depend on it (default: %(default)s)")
    d.add_argument("--chat-template", action="store_true",
                   help="render prompt/response records with the tokenizer's own chat template (a user turn, then "
                        "the assistant's reply, which alone is in the loss); text records are unchanged")
    d.add_argument("--token-mask", choices=("attention", "labels"), default="attention",
                   help="tokens of the Kronecker factors: every non-padding token, or those with a next-token "
                        "label (default: %(default)s)")
    lo = p.add_argument_group("LoRA (written to adapter_config.json)")
    lo.add_argument("--rank", type=_positive_int, default=8, metavar="r", help="LoRA rank (default: %(default)s)")
    lo.add_argument("--lora-alpha", type=_positive_float, default=16.0, metavar="A",
                    help="PEFT lora_alpha; scaling A/r, or A/sqrt(r) with --rslora (default: %(default)s)")
    lo.add_argument("--rslora", action="store_true", help="rank-stabilised scaling lora_alpha/sqrt(r) (the paper's)")
    lo.add_argument("--target-modules", default="all-linear", metavar="T",
                    help="'all-linear' (every linear layer but the output head), comma-separated module names "
                         "or dotted suffixes (q_proj,v_proj), or a regex on full module names, as PEFT "
                         "(default: %(default)s)")
    da = p.add_argument_group("LoRA-DA")
    da.add_argument("--beta", type=_nonneg_float, default=0.03,
                    help="weight of the variance term; 0 gives the truncated SVD of the Fisher-gradient "
                         "(default: %(default)s)")
    da.add_argument("--gamma", type=_positive_float, default=1024.0,
                    help="the factors are divided by sqrt(gamma) (default: %(default)s)")
    da.add_argument("--population-size", type=_positive_int, default=None, metavar="N", help=POPULATION_HELP)
    da.add_argument("--damping", type=_positive_float, default=1e-6,
                    help="damping added to both Kronecker factors (default: %(default)s)")
    da.add_argument("--max-damping", type=_positive_float, default=1.0,
                    help="when the input statistics are not positive definite within damping/2 (fp32 rounding of a "
                         "singular input factor) the damping is raised tenfold, up to this bound; the damping used "
                         "is in the table and the report (default: %(default)s)")
    da.add_argument("--keep-tokens", choices=("auto", "always", "never"), default="auto",
                    help="keep every token's inputs and output gradients and solve exactly through them (float64, "
                         "the same result whatever the batch size or number of ranks): auto for the input groups "
                         "with at most twice as many tokens as inputs (default: %(default)s)")
    da.add_argument("--sensitivity", choices=("auto", "always", "never"), default="auto",
                    help="how much each module's adapter moves when the statistics move by one fp32 ulp, and flag "
                         "the modules the data does not determine: auto estimates it for every module from the "
                         "solve itself, always measures it by solving every module twice (default: %(default)s)")
    da.add_argument("--seed", type=_seed, default=0,
                    help="seed of the iterative eigensolver's start vectors; the subspace does not depend on it "
                         "(default: %(default)s)")
    rt = p.add_argument_group("runtime")
    rt.add_argument("--layers-per-pass", type=_layers_per_pass, default=None, metavar="K|auto",
                    help="stream the model through several statistics passes of K layers each (bounded memory: "
                         "one data pass per slice); auto plans K from free GPU memory (default: one pass)")
    rt.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="model dtype; auto = float32 on CPU, the checkpoint's dtype on GPU (default: %(default)s)")
    rt.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    rt.add_argument("--device-map", choices=["auto"], default=None,
                    help="split the model over the GPUs of this process (accelerate's device_map='auto'; under "
                         "torchrun, over this rank's share of the machine's GPUs) instead of --device")
    rt.add_argument("--quiet", action="store_true", help="no progress bars, table or summary; errors only")
    rt.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of the table")
    return parser
