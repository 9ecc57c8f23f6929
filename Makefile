# Each target creates .venv and installs what it needs, so a fresh clone works as is.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test bench demo clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest

bench: $(STAMP)
	$(PYTHON) -m continuity.benchmarks.run

demo: $(STAMP)
	$(VENV)/bin/continuity demo --out demo-out

clean:
	rm -rf $(VENV) .pytest_cache bench-results demo-out
