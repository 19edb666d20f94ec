# gsqbench: `make test` and `make demo` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# Two subjects at a time (--jobs 2), one intra-op thread each: the demo's tiny convolutions gain little from a
# second thread, and a fixed thread count makes the CPU results bitwise reproducible (whatever --jobs is), so they
# match baselines/demo.csv (`gsqbench regress`).
demo: $(STAMP)
	$(VENV)/bin/gsqbench run configs/demo.yaml --report reports/demo --threads 1 --jobs 2

clean:
	rm -rf $(VENV) reports/demo results
