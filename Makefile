# Each target creates .venv and installs what it needs, so a fresh clone works as is.
# Installs are pinned by constraints.txt (the versions the tests ran with); `make lock`
# refreshes it from the newest releases pyproject.toml allows.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test unit lint format bench chaos demo lock clean fuzz prometheus-tools config-reference

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Spread over the machine's cores a test file at a time (pytest-xdist): a file's fixtures
# (a recorded stream, a reference run) are built once, and each worker starts its own broker.
# One worker more than cores: the tests wait (group joins, idle timeouts, subprocesses joining
# and compiling) for about a third of their time, which a third worker fills on 2 cores
# (568-615 s with 2 workers, 367 s with 3: BENCHMARKS.md, "The test suite").
PYTEST_WORKERS  := $(shell python3 -c 'import os; print(len(os.sched_getaffinity(0)) + 1)')
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadfile

test: $(STAMP) prometheus-tools
	$(PYTHON) -m pytest $(PYTEST_PARALLEL)

# promtool and a real Prometheus server check deploy/prometheus (tests/test_deploy.py): Debian's
# `prometheus` package (2.42) brings both (the tests start their own server on a free port; in a
# container policy-rc.d keeps the package's daemon from starting). Installed here when missing,
# as root (CI runs as root); anyone else is told the command to run.
prometheus-tools:
	@if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then \
	  if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	    echo "make: promtool and prometheus are missing (tests/test_deploy.py needs them): install Debian's prometheus package as root: apt-get install -y prometheus" >&2; \
	    exit 1; \
	  fi; \
	  echo "make: installing Debian's prometheus package (promtool and the server, for tests/test_deploy.py)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
	    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; \
	fi

unit: $(STAMP)
	$(PYTHON) -m pytest -m unit $(PYTEST_PARALLEL)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The properties of tests/test_fuzz.py at scale (>= 100,000 inputs per codec; 15-30 min on
# 2 cores): prints how many inputs ran and how many exceptions escaped (see BENCHMARKS.md).
fuzz: $(STAMP)
	CONTINUITY_FUZZ_EXAMPLES=12000 $(PYTHON) -m pytest tests/test_fuzz.py -q -s --timeout=0 -p no:cacheprovider

# The README's config reference, generated from the config sections' declarations (a test checks it).
config-reference: $(STAMP)
	$(PYTHON) -c 'from continuity.config import update_readme; update_readme("README.md")'

bench: $(STAMP)
	$(PYTHON) -m continuity.benchmarks.run

# SIGKILLs, a corrupt checkpoint and a broker outage against a running serve, then the lineage check.
chaos: $(STAMP)
	$(PYTHON) -m continuity.benchmarks.chaos

demo: $(STAMP)
	$(VENV)/bin/continuity demo --out demo-out

# A fresh venv with the newest allowed releases, frozen: commit constraints.txt after `make test` passes.
lock:
	rm -rf .lock-venv
	python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	( echo "# The tested versions: make installs with -c constraints.txt. Refresh with make lock."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip==' | sort ) > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis bench-results demo-out
