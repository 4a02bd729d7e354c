import re

from setuptools import setup

VERSION = re.search(r'__version__ = "([^"]+)"', open("lora_da_fast/version.py").read()).group(1)
# kernels/ (the Triton kernels) is installed as lora_da_fast.kernels through the link lora_da_fast/kernels.
# It has no __init__.py on purpose: a folder without one is a namespace portion, which never wins over
# another distribution's regular `kernels` package (Hugging Face's, which transformers imports), even when
# Python is started in this folder and finds ./kernels first.
SUBPACKAGES = ["cli", "kernels", "ops", "solve", "statistics"]

setup(
    name="lora_da_fast",
    version=VERSION,
    description="Fast, exact LoRA-DA (data-aware LoRA initialisation) for Hugging Face models",
    python_requires=">=3.10",
    packages=["lora_da_fast"] + [f"lora_da_fast.{p}" for p in SUBPACKAGES],
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.46",
        "peft>=0.13",
        "numpy",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "demo": ["gguf", "matplotlib"],
    },
    entry_points={"console_scripts": ["lora-da-fast=lora_da_fast.__main__:console"]},
)
