"""``python -m lora_da_fast``: the ``lora-da-fast`` command line."""
import sys

from .cli import main

sys.exit(main())
