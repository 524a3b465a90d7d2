# reprolab: `make run` (the embedded demo) and `make test` do all the set-up on a fresh machine.
PY      ?= .venv/bin/python
VENV    := .venv/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
T       ?=
D       ?=
LAUNCHER ?= local
# pytest-xdist processes for `make test`; each test uses one torch thread (tests/conftest.py)
WORKERS ?= 2

.PHONY: help install run test test-all lint format bench data table aggregate tables clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(VENV): pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -e '.[dev]'
	touch $(VENV)

install: $(VENV)  ## create .venv and install reprolab with dev extras

run: $(VENV)  ## the embedded demo: tiny_clip on the synthetic shapes world, offline
	$(OFFLINE) $(PY) train.py

test: $(VENV)  ## fast tests (CPU, offline), WORKERS processes (one thread each)
	$(OFFLINE) $(PY) -m pytest -q -n $(WORKERS)

test-all: $(VENV)  ## every test, slow ones included (data tests still need DATA_ROOT)
	$(OFFLINE) $(PY) -m pytest -q -n $(WORKERS) -m "not gpu"

lint: $(VENV)  ## ruff lint + format check
	$(PY) -m ruff check src scripts tests train.py
	$(PY) -m ruff format --check src scripts tests train.py

format: $(VENV)
	$(PY) -m ruff format src scripts tests train.py
	$(PY) -m ruff check --fix src scripts tests train.py

bench: $(VENV)  ## speed/memory benchmarks (ratios measured in one run)
	$(OFFLINE) $(PY) scripts/bench_blackvip.py
	$(OFFLINE) $(PY) scripts/bench_finetune.py
	$(OFFLINE) $(PY) scripts/bench_feature_cache.py
	$(OFFLINE) $(PY) scripts/bench_mixdiff.py

data: $(VENV)  ## prepare one dataset: make data D=caltech101 (needs internet)
	$(PY) scripts/prepare_data.py $(D)

table: $(VENV)  ## launch a paper table: make table T=blackvip_tiny [LAUNCHER=slurm]
	$(OFFLINE) $(PY) train.py -m table=$(T) hydra/launcher=$(LAUNCHER)

aggregate: $(VENV)  ## rebuild results/<paper>/<table>.{md,csv,png} from finished runs
	$(OFFLINE) $(PY) scripts/aggregate.py $(T)

tables: $(VENV)  ## list every table with its cell and seed counts
	$(PY) scripts/list_tables.py

clean:
	rm -rf logs outputs multirun .pytest_cache
