"""Triton kernels of lora_da_fast, installed as ``lora_da_fast.kernels`` (never as a top-level
``kernels`` package, which would shadow the Hugging Face package of that name).

Each module holds only ``@triton.jit`` code and its config lists; the launchers are in
``lora_da_fast.ops``."""
