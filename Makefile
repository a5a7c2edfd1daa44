# Two commands on a fresh machine:  make demo  (report of the offline demo)   make test  (the test suite)
# Both create .venv and install everything first. Override the torch pins for other machines, e.g.
#   make test TORCH_SPEC="torch torchvision"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup system-deps node-deps demo test clean-outputs

$(VENV)/.installed: pyproject.toml setup.py reportgen/state/map_kernels.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# gcc for the fused CPU kernels (reportgen/state/map_kernels.c, compiled by pip install), graphviz (dot) for graph
# diagrams, Chromium for browser tests, SLURM and munge for the one-node cluster of tests/test_slurm.py; installed
# with apt-get where we are root (the daemons are not started: the tests start them).
SYSTEM_PACKAGES := gcc graphviz chromium slurmctld slurmd slurm-client munge
SYSTEM_PROGRAMS := gcc dot chromium slurmctld slurmd sbatch munged
system-deps:
	@missing=; for p in $(SYSTEM_PROGRAMS); do PATH="$$PATH:/usr/sbin:/sbin" command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); \
	else echo "note: missing$$missing; install $(SYSTEM_PACKAGES) with your package manager for graph diagrams," \
	  "browser tests and the SLURM tests (skipped without them)"; fi

# axe-core (npm package.json -> ./node_modules) for the accessibility checks of the browser tests
node-deps:
	@if ! command -v npm >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm; fi
	@if command -v npm >/dev/null 2>&1; then npm install --no-audit --no-fund --silent; \
	else echo "note: install node and npm for the accessibility checks (axe-core) of the browser tests"; fi

setup: system-deps node-deps $(VENV)/.installed

demo: setup
	$(PY) run.py

test: setup
	$(PY) -m pytest -q

clean-outputs:
	rm -rf outputs/*/ outputs/multirun
