# spam_mlops: two commands on a fresh machine — `make demo` (the whole system on its embedded defaults)
# and `make test`. Both install what they need first.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3.11
# Where the corpus comes from: the UCI download by default; on machines without internet access point
# SPAM_MLOPS_SOURCE at a local copy (this repository's CI and demo use ../shared/data when it exists).
LOCAL_CORPUS := $(wildcard ../shared/data/SMSSpamCollection)
ifneq ($(LOCAL_CORPUS),)
export SPAM_MLOPS_SOURCE ?= $(abspath $(LOCAL_CORPUS))
endif
export SPAM_MLOPS_LAKE ?= ./lake
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: install tools demo test lint lab readme docs check bench audit clean
APT_PACKAGES := chromium wrk hey postgresql-client

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=25"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# what the tests and benchmarks need beyond Python: Debian packages (chromium: docs pages in a real browser;
# wrk, hey: load generators of bench/; postgresql-client: pg_dump/pg_restore) and the validation tools
# (scripts/install-tools.sh: promtool, Prometheus, Pushgateway, kubectl, kubernetes-validate, checkov, hadolint)
tools:
	@command -v chromium >/dev/null && command -v hey >/dev/null && command -v pg_dump >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; }
	scripts/install-tools.sh

# every stage on the embedded defaults: lake ./lake, MLflow sqlite:///mlflow.db, Feast on SQLite, Ray in-process.
# Each stage prints its result line; `make demo VERBOSE=1` also shows TensorFlow's, Ray's and MLflow's start-up logs.
CLI = $(BIN)/spam-mlops$(if $(VERBOSE), -v)
demo: install
	$(CLI) ingest
	$(CLI) curate
	$(CLI) features
	$(CLI) feast-apply
	$(CLI) materialize
	$(CLI) train
	$(CLI) tune --num-samples 4 --epochs 2 --grace-period 1 --sample-n 1500
	BIN=$(BIN) scripts/demo-serve.sh
	$(CLI) drift --demo-traffic 500 --messages 500 --retrain off
	BIN=$(BIN) VERBOSE=$(VERBOSE) scripts/demo-loop.sh

test: install tools
	$(BIN)/nbdev-test --n-workers 2
	$(BIN)/pytest -ra --durations=30

# notebooks and library in sync, outputs clean (CI fails on any diff)
check: install
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
	git diff --exit-code -- nbs spam_mlops || (echo "Notebooks and library are not in sync, or outputs not clean" && exit 1)

lint: install
	$(BIN)/ruff check spam_mlops tests bench

lab: install
	$(BIN)/jupyter lab nbs/

# README.md is rendered from nbs/index.ipynb (nbdev-readme needs Quarto; nbconvert does the same offline)
readme: install
	$(BIN)/jupyter nbconvert --to markdown nbs/index.ipynb --output-dir . --output README --log-level WARN

# the docs site (Quarto must be installed: the GitHub workflow sets it up) into _docs/; tests/test_docs.py checks
# the same pages offline without Quarto
docs: install
	$(BIN)/nbdev-docs

bench: install
	$(BIN)/python bench/pipeline.py

# known vulnerabilities in the locked dependencies (runbook, "Dependency audit"). --strict: a package that could not be
# audited (no access to PyPI's JSON API or OSV) fails the audit instead of passing it unchecked
audit: install
	$(BIN)/pip-audit -r constraints.txt --no-deps --disable-pip --progress-spinner off --strict

clean:
	rm -rf lake landing mlflow.db mlruns _proc _docs
