# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned first in the same pip command, so that no other package pulls a larger torch build
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint test-gpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN) -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/brainmt demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed lint
	$(PY) -m pytest -m "not gpu" tests

# on a CUDA machine with the compiled kernels installed (see README, "GPU tests")
test-gpu:
	$(PYTHON) -m pytest -m gpu tests -v

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
