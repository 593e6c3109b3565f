# `make run`  — install if needed, then run the whole pipeline on the embedded default (writes ./lake)
# `make test` — install if needed, then lint and format check (ruff), type-check the kernels and schemas (mypy), run the test suite
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install run test test-fast bench bench-sized bench-setup airflow-ui airflow-deployed clean

install: $(INSTALLED)

# DS_BUILD_OPS=0: DeepSpeed compiles nothing at install time (its CPU ops are JIT-built if ever used).
# Debian's chromium + chromedriver drive the explorer's browser test (Selenium, no browser download).
$(INSTALLED): requirements.txt pyproject.toml
	command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver; } || \
	  echo "warning: could not install Debian's chromium/chromium-driver; only the explorer's browser test needs them"
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && command -v java >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q postgresql default-jre-headless; } || \
	  echo "warning: could not install Debian's postgresql/java; only the deployed-Airflow and Apache Spark tests need them"
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PYTHON) -m pip install --quiet --progress-bar off -r requirements.txt
	$(PYTHON) -m pip install --quiet --no-deps -e .
	PYTHON=$(CURDIR)/$(PYTHON) bash infra/deploy/spark-connect.sh fetch || \
	  echo "warning: could not fetch the Delta / hadoop-aws jars from Maven Central; only the Apache Spark test needs them"
	touch $(INSTALLED)

run: install
	$(PYTHON) -m jobs pipeline

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PYTHON) -m pytest -q

# the unit tier: every test that needs no trained lake and no end-to-end service (tests/conftest.py)
test-fast: install
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest -q -m "not slow"

# OMP_NUM_THREADS=1 and nice: the numbers are ratios measured in one process, on a shared CPU. Needs
# `make run`'s lake. Each script's output is kept in reports/bench/; every ratio and every aim (a line
# `aim: <what> ≥ <aim>: measured <value> (met|not met)`) are printed at the end.
BENCH_SCRIPTS := extract_overhead projection_fidelity correction_diagnosis score_throughput compression two_stage scaling file_count extract_workers bergson_compare tail_patch_threads
bench: install bench-setup
	mkdir -p reports/bench
	set -o pipefail; for name in $(BENCH_SCRIPTS); do \
	  echo "== bench/$$name.py"; OMP_NUM_THREADS=1 nice $(PYTHON) bench/$$name.py 2>&1 | tee reports/bench/$$name.txt || exit 1; done
	set -o pipefail; echo "== bench/extract_overhead.py at GPT-2 small (124M parameters, d = 67,081; ~4 minutes)"; \
	  OMP_NUM_THREADS=1 nice $(PYTHON) bench/extract_overhead.py --model gpt2-small --batch 2 --k 37 2>&1 | tee reports/bench/extract_overhead_gpt2.txt
	set -o pipefail; if nvidia-smi -L >/dev/null 2>&1; then \
	  echo "== bench/gpu.py"; $(PYTHON) bench/gpu.py --out reports/bench/gpu.json 2>&1 | tee reports/bench/gpu.txt || exit 1; \
	else echo "== bench/gpu.py: skipped, no GPU here (the last run, on an H200: docs/results/gpu-h200.txt)"; fi
	@echo "== every ratio (reports/bench/<script>.txt)"
	@grep -E "^[A-Za-z0-9_]+=[-+0-9.]" reports/bench/*.txt | sed 's|reports/bench/||; s|\.txt:|: |'
	@echo "== every aim, with its measured value"
	@grep -h "^aim: " reports/bench/*.txt

# Sized runs (a C4-like partition, a GPT-2-small shape at d ~ 2^16; ~1 hour on 2 cores, after `make run`),
# then docs/capacity.md from their rates and the GPU runs in docs/results/
bench-sized: install
	mkdir -p reports/bench
	set -o pipefail; $(PYTHON) bench/sized_runs.py --out reports/bench/sized_runs.json 2>&1 | tee reports/bench/sized_runs.txt
	cp reports/bench/sized_runs.json docs/results/sized-cpu.json
	$(PYTHON) bench/capacity.py

# the comparison venv for bench/bergson_compare.py (bergson 2.5.1, kept out of requirements.txt)
bench-setup:
	bash bench/setup_bergson.sh

# The DAGs in the Airflow UI on http://127.0.0.1:8080 (project-local AIRFLOW_HOME, SQLite, 2 workers)
airflow-ui: install
	AIRFLOW_HOME=$(CURDIR)/.airflow AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags AIRFLOW__CORE__LOAD_EXAMPLES=False \
	AIRFLOW__CORE__PARALLELISM=2 AIRFLOW__API__HOST=127.0.0.1 \
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH TRACKSTAR_LAKE_ROOT=$(CURDIR)/lake $(VENV)/bin/airflow standalone

# Airflow as deployed (PostgreSQL, API server, scheduler, DAG processor, LocalExecutor; infra/deploy/) on a
# small lake: triggers trackstar_reindex through the REST API twice (tests/test_airflow_deployed.py)
airflow-deployed: install
	$(PYTHON) -m pytest -q tests/test_airflow_deployed.py

clean:
	rm -rf lake reports .airflow
