# inference-bridge: every command a user or CI needs. `make help` lists them.
# Everything the project needs is installed here (venv, Kafka jars), cached under ignored folders.

SHELL := /bin/bash
# A recipe line stops at its first failing command, an unset variable or a failing stage of a pipe, and a target
# whose recipe failed is deleted, so a half-made stamp or file is never taken as up to date.
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KAFKA_JARS := .cache/kafka/jars
MVN_DEP_PLUGIN := org.apache.maven.plugins:maven-dependency-plugin:3.8.1

.DEFAULT_GOAL := help
.PHONY: help install lock lock-check kafka-jars lint format test test-unit demo run check-config clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

# Two locks, hash-pinned by pip-tools (`make lock`). requirements.lock: the runtime dependencies the image installs,
# plus setuptools to build its wheel offline. requirements-dev.lock: the same pins (compiled with requirements.lock
# as a constraint), the dev extra, pip and the editable build's setuptools. The venv installs only the dev lock and
# then the service without dependencies or build isolation, so nothing unpinned is downloaded and the tests run on
# the image's transitive versions (tests/unit/test_habits.py checks the locks against pyproject.toml offline).
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
PIP_COMPILE_FLAGS := --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links
LOCK_FLAGS := --build-deps-for=wheel
DEV_LOCK_FLAGS := --build-deps-for=editable --extra=dev
# More pip-compile options for `make lock`, e.g. LOCK_ARGS='--upgrade-package aiohttp' or LOCK_ARGS=--upgrade.
LOCK_ARGS ?=

$(VENV)/.installed: pyproject.toml $(DEV_LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r $(DEV_LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed ## create the venv from requirements-dev.lock (hash-checked) and install the service

lock: install ## regenerate requirements.lock and requirements-dev.lock from pyproject.toml (needs PyPI)
	$(VENV)/bin/pip-compile $(PIP_COMPILE_FLAGS) $(LOCK_FLAGS) $(LOCK_ARGS) --output-file $(LOCK) pyproject.toml
	$(VENV)/bin/pip-compile $(PIP_COMPILE_FLAGS) $(DEV_LOCK_FLAGS) $(LOCK_ARGS) --constraint $(LOCK) \
	    --output-file $(DEV_LOCK) pyproject.toml

# Compiles both locks again in a temporary folder, starting from the committed ones (pip-compile keeps their pins
# where pyproject.toml allows them), and compares the pins.
lock-check: install ## fail if a lock is out of date with pyproject.toml (needs PyPI)
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	cp $(LOCK) $(DEV_LOCK) "$$tmp"; \
	$(VENV)/bin/pip-compile $(PIP_COMPILE_FLAGS) $(LOCK_FLAGS) --output-file "$$tmp/$(LOCK)" pyproject.toml; \
	$(VENV)/bin/pip-compile $(PIP_COMPILE_FLAGS) $(DEV_LOCK_FLAGS) --constraint "$$tmp/$(LOCK)" \
	    --output-file "$$tmp/$(DEV_LOCK)" pyproject.toml; \
	stale=0; \
	for lock in $(LOCK) $(DEV_LOCK); do \
	    diff <(grep -E '^[a-z0-9]' "$$lock") <(grep -E '^[a-z0-9]' "$$tmp/$$lock") \
	        || { echo "$$lock is stale: run make lock" >&2; stale=1; }; \
	done; \
	if [ "$$stale" = 1 ]; then exit 1; fi; \
	echo "$(LOCK) and $(DEV_LOCK) are up to date"

$(KAFKA_JARS)/.complete: kafka-runtime/pom.xml
	rm -rf $(KAFKA_JARS)
	mvn -B -q -f kafka-runtime/pom.xml $(MVN_DEP_PLUGIN):copy-dependencies \
	    -DoutputDirectory=$(CURDIR)/$(KAFKA_JARS) -DincludeScope=runtime
	touch $@

kafka-jars: $(KAFKA_JARS)/.complete ## fetch a Kafka 4.x broker's jars from Maven Central (cached)

# .pre-commit-config.yaml runs the same checks as git hooks; keep the two in step.
lint: install lint-docker lint-helm ## ruff (lint + format check), mypy --strict, hadolint, helm lint
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/ruff format --check service tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/pre-commit validate-config .pre-commit-config.yaml

format: install ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff format service tests bench
	$(VENV)/bin/ruff check --fix service tests bench

test: install kafka-jars helm ## the whole suite; starts a local Kafka broker unless KAFKA_BOOTSTRAP_SERVERS is set
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install ## unit tests only (no broker)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

demo: install kafka-jars ## local broker + fake APIs + a realistic mix of records, run until drained, then a summary
	$(PY) -m tests.support.demo

run: install ## run the service with settings from BRIDGE_* environment variables
	$(PY) -m service

check-config: install ## validate BRIDGE_* settings and print them with secrets redacted
	$(PY) -m service check-config

clean: ## remove the venv and caches (Kafka jars included)
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache

# Feature areas keep their targets in mk/*.mk (helm, image, chaos, bench).
-include mk/*.mk
