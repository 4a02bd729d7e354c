"""How the package imports, from anywhere: the repository's kernels/ folder never shadows another
distribution's ``kernels`` package (Hugging Face's, which transformers imports when it loads a model),
however Python is started in the repository root; ``import lora_da_fast`` loads neither transformers nor
peft until something needs them; every public name resolves."""
import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_in_root(code: str, extra_path: str = None, args=("-c",)) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, *args, textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _fake_kernels_distribution(tmp_path) -> str:
    """A regular package named ``kernels`` (as Hugging Face's is) in a folder of its own."""
    pkg = tmp_path / "site" / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("WHO = 'the other distribution'\n")
    return str(tmp_path / "site")


def test_repository_kernels_never_shadow_another_kernels_package(tmp_path):
    """Started in the root (``python -c``: ``sys.path[0]`` is the root, ahead of every installed
    package), ``import kernels`` is the other distribution's, and ``lora_da_fast.kernels`` is ours."""
    site = _fake_kernels_distribution(tmp_path)
    code = """
        import kernels
        assert getattr(kernels, "WHO", None) == "the other distribution", kernels
        import lora_da_fast.kernels.grad_stats as gs, lora_da_fast.kernels.sym_accumulate as sa
        print(gs.__name__, sa.__name__)
    """
    got = _run_in_root(code, extra_path=site)
    assert got.returncode == 0, got.stderr
    assert "lora_da_fast.kernels.grad_stats lora_da_fast.kernels.sym_accumulate" in got.stdout
    script = tmp_path / "script.py"  # a script run from the root: sys.path[0] is the script's folder, cwd the root
    script.write_text("import kernels\nprint(kernels.WHO)\n")
    got = _run_in_root(str(script), extra_path=f"{ROOT}{os.pathsep}{site}", args=())
    assert got.returncode == 0 and "the other distribution" in got.stdout, got.stderr


def test_transformers_model_code_imports_from_the_root():
    """The README's commands run from the root; transformers (5.25 and later) imports Hugging Face's
    ``kernels`` when its model code loads."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    code = """
        import os, transformers.modeling_utils, lora_da_fast.kernels.grad_stats, kernels
        assert kernels.__file__ and os.path.dirname(os.path.abspath(kernels.__file__)) != os.path.abspath("kernels")
    """
    got = _run_in_root(code)
    assert got.returncode == 0, got.stderr


def test_import_loads_neither_transformers_nor_peft():
    code = """
        import sys
        import lora_da_fast, lora_da_fast.triangle, lora_da_fast.config
        cfg = lora_da_fast.LoraDAConfig(rank=4)
        heavy = sorted(m for m in ("transformers", "peft") if m in sys.modules)
        assert not heavy, heavy
        from lora_da_fast import initialize_lora_da  # what needs peft loads it
        assert "peft" in sys.modules
        print("ok")
    """
    got = _run_in_root(code)
    assert got.returncode == 0 and got.stdout.strip() == "ok", got.stderr


def test_every_public_name_resolves():
    import lora_da_fast

    for name in lora_da_fast.__all__:
        assert getattr(lora_da_fast, name) is not None, name
    assert set(lora_da_fast.__all__) <= set(dir(lora_da_fast))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lora_da_fast.nope  # noqa: B018
    from lora_da_fast.peft_integration import get_lora_da_state_dict, initialize_lora_da_weights

    assert lora_da_fast.get_lora_da_state_dict is get_lora_da_state_dict
    assert lora_da_fast.initialize_lora_da_weights is initialize_lora_da_weights
