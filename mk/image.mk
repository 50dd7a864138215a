# Image: build the container image and lint its Dockerfile; `lock` pins the runtime dependencies with hashes.
# `make image` needs a Docker engine (BuildKit); lint-docker and lock do not.

DOCKER ?= docker
IMAGE ?= inference-bridge
# Lazy (=): only evaluated by the targets that use them.
IMAGE_VERSION = $(shell $(PYTHON) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
IMAGE_TAG ?= $(IMAGE_VERSION)
IMAGE_REVISION = $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
IMAGE_CREATED = $(shell date -u +%Y-%m-%dT%H:%M:%SZ)
# requirements.lock: the [project] dependencies plus the build backend (setuptools, from [build-system]) so
# the image builds the service's wheel offline with hash-checked tools only. No dev extras.
PIP_COMPILE_FLAGS := --quiet --generate-hashes --allow-unsafe --build-deps-for=wheel --strip-extras \
	--no-emit-index-url --no-emit-find-links

.PHONY: image lint-docker lock lock-check

image: ## build the container image inference-bridge:<version> (needs a running Docker engine)
	@$(DOCKER) info >/dev/null 2>&1 || { echo "make image: needs a running Docker engine ('$(DOCKER) info' failed)" >&2; exit 1; }
	DOCKER_BUILDKIT=1 $(DOCKER) build \
	    --build-arg VERSION=$(IMAGE_VERSION) \
	    --build-arg REVISION=$(IMAGE_REVISION) \
	    --build-arg CREATED=$(IMAGE_CREATED) \
	    --tag $(IMAGE):$(IMAGE_TAG) .

lint-docker: install ## hadolint the Dockerfile (no findings allowed)
	$(VENV)/bin/hadolint Dockerfile

lock: install ## regenerate requirements.lock (runtime dependencies pinned with hashes) from pyproject.toml
	$(VENV)/bin/pip-compile $(PIP_COMPILE_FLAGS) --output-file requirements.lock pyproject.toml

lock-check: install ## fail if requirements.lock is out of date with pyproject.toml (needs PyPI)
	@tmp=$$(mktemp -d) && cp requirements.lock $$tmp/requirements.lock && \
	$(VENV)/bin/pip-compile $(PIP_COMPILE_FLAGS) --output-file $$tmp/requirements.lock pyproject.toml && \
	if diff -q <(grep -E '^[a-z0-9]' requirements.lock) <(grep -E '^[a-z0-9]' $$tmp/requirements.lock) >/dev/null; then \
	    rm -rf $$tmp; echo "requirements.lock is up to date"; \
	else \
	    diff <(grep -E '^[a-z0-9]' requirements.lock) <(grep -E '^[a-z0-9]' $$tmp/requirements.lock); rm -rf $$tmp; \
	    echo "requirements.lock is stale: run make lock" >&2; exit 1; \
	fi
