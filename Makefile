VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean

# The virtualenv is rebuilt whenever pyproject.toml or the C module (setup.py) changes.
$(STAMP): pyproject.toml setup.py edge/_logline.c
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/cdn up --config configs/demo.toml

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check edge control tests benchmarks
	$(VENV)/bin/mypy edge control

bench: $(STAMP)
	$(PY) benchmarks/run.py
	$(PY) benchmarks/propagation.py
	$(PY) benchmarks/logdelay.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
