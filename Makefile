# inference-bridge: every command a user or CI needs. `make help` lists them.
# Everything the project needs is installed here (venv, Kafka jars), cached under ignored folders.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KAFKA_JARS := .cache/kafka/jars
MVN_DEP_PLUGIN := org.apache.maven.plugins:maven-dependency-plugin:3.8.1

.DEFAULT_GOAL := help
.PHONY: help install kafka-jars lint format test test-unit demo run check-config clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create the venv and install the service with its dev tools

$(KAFKA_JARS)/.complete: kafka-runtime/pom.xml
	rm -rf $(KAFKA_JARS)
	mvn -B -q -f kafka-runtime/pom.xml $(MVN_DEP_PLUGIN):copy-dependencies \
	    -DoutputDirectory=$(CURDIR)/$(KAFKA_JARS) -DincludeScope=runtime
	touch $@

kafka-jars: $(KAFKA_JARS)/.complete ## fetch a Kafka 4.x broker's jars from Maven Central (cached)

lint: install lint-docker lint-helm ## ruff (lint + format check), mypy --strict, hadolint, helm lint
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/ruff format --check service tests bench
	$(VENV)/bin/mypy

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
