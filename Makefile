# `make run`  — install if needed, then run the whole pipeline on the embedded default (writes ./lake)
# `make test` — install if needed, then run the test suite
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install run test bench clean

install: $(INSTALLED)

# DS_BUILD_OPS=0: DeepSpeed compiles nothing at install time (its CPU ops are JIT-built if ever used).
$(INSTALLED): requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PYTHON) -m pip install --quiet --progress-bar off -r requirements.txt
	touch $(INSTALLED)

run: install
	$(PYTHON) -m jobs pipeline

test: install
	$(PYTHON) -m pytest -q

bench: install
	for script in bench/*.py; do echo "== $$script"; $(PYTHON) $$script || exit 1; done

clean:
	rm -rf lake reports .airflow
