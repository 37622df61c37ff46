# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned first in the same pip command, so that no other package pulls a larger torch build
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint test-gpu clean slurm-packages
SLURM_PACKAGES := slurmctld slurmd slurm-client munge slurmdbd mariadb-server

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN) -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/brainmt demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# the SLURM tests start a real single-node SLURM from Debian's packages (as root); install them if missing
slurm-packages:
	@if [ "$$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null 2>&1; then \
		echo "installing $(SLURM_PACKAGES)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SLURM_PACKAGES) >/dev/null; \
	fi

test: $(VENV)/.installed lint slurm-packages
	$(PY) -m pytest -m "not gpu" --durations=15 tests

# on a CUDA machine with the compiled kernels installed (see docs/model.md, "GPU tests")
test-gpu:
	$(PYTHON) -m pytest -m gpu tests -v

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
