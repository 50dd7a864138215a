# Image: build the container image and lint its Dockerfile. It installs requirements.lock (`make lock`, in the
# Makefile). `make image` needs a container engine: Docker (BuildKit) or Podman/Buildah (`make image DOCKER=podman`);
# lint-docker does not. `make image-pin` resolves the base image's current digest and pins it.

DOCKER ?= docker
IMAGE ?= inference-bridge
# Lazy (=): only evaluated by the targets that use them.
IMAGE_VERSION = $(shell $(PYTHON) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
IMAGE_TAG ?= $(IMAGE_VERSION)
IMAGE_REVISION = $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
IMAGE_CREATED = $(shell date -u +%Y-%m-%dT%H:%M:%SZ)
# The base image and its pinned digest live in the Dockerfile (its ARG defaults), so a plain `docker build .`
# builds the same image; `make image-pin` rewrites them. Another PYTHON_IMAGE builds from its tag unless
# PYTHON_IMAGE_DIGEST is given too: the pinned digest belongs to the Dockerfile's image only.
DOCKERFILE_PYTHON_IMAGE := $(shell sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)
DOCKERFILE_PYTHON_DIGEST := $(shell sed -n 's/^ARG PYTHON_IMAGE_DIGEST=//p' Dockerfile)
PYTHON_IMAGE ?= $(DOCKERFILE_PYTHON_IMAGE)
PYTHON_IMAGE_DIGEST ?= $(if $(filter $(DOCKERFILE_PYTHON_IMAGE),$(PYTHON_IMAGE)),$(DOCKERFILE_PYTHON_DIGEST))
# Set to 1 for a release build: refuse to build from an unpinned base.
IMAGE_REQUIRE_PIN ?= 0
# More flags for `$(DOCKER) build`, e.g. IMAGE_BUILD_FLAGS='--platform linux/arm64'.
IMAGE_BUILD_FLAGS ?=
.PHONY: image image-pin lint-docker

image: ## build the container image inference-bridge:<version> with docker, or podman (DOCKER=podman)
	@$(DOCKER) info >/dev/null 2>&1 || { echo "make image: needs a running container engine ('$(DOCKER) info' failed; DOCKER=podman for Podman)" >&2; exit 1; }
	@if [ -z "$(PYTHON_IMAGE_DIGEST)" ]; then \
	    if [ "$(IMAGE_REQUIRE_PIN)" = 1 ]; then echo "make image: $(PYTHON_IMAGE) is not pinned by digest: run make image-pin" >&2; exit 1; fi; \
	    echo "make image: warning: base $(PYTHON_IMAGE) is not pinned by digest (make image-pin pins it)" >&2; \
	fi
	DOCKER_BUILDKIT=1 $(DOCKER) build $(IMAGE_BUILD_FLAGS) \
	    --build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) \
	    --build-arg PYTHON_IMAGE_DIGEST=$(PYTHON_IMAGE_DIGEST) \
	    --build-arg VERSION=$(IMAGE_VERSION) \
	    --build-arg REVISION=$(IMAGE_REVISION) \
	    --build-arg CREATED=$(IMAGE_CREATED) \
	    --tag $(IMAGE):$(IMAGE_TAG) .

# The digest of the manifest the registry serves for the tag (for a multi-arch tag, its index: every platform
# stays pinned). With skopeo, the sha256 of the raw manifest, nothing pulled; else $(DOCKER) pulls the tag and
# reports the repository digest it pulled. Validated, then written into the Dockerfile's ARG defaults.
image-pin: ## pin the base image by digest in the Dockerfile: resolve PYTHON_IMAGE's digest now (needs its registry)
	@set -euo pipefail; ref='$(PYTHON_IMAGE)'; \
	if command -v skopeo >/dev/null 2>&1; then \
	    digest="sha256:$$(skopeo inspect --raw "docker://$$ref" | sha256sum | cut -d' ' -f1)"; \
	else \
	    $(DOCKER) pull --quiet "$$ref" >/dev/null; \
	    digest="$$($(DOCKER) image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$$ref" | sed -n 's/^.*@//p' | head -n 1)"; \
	fi; \
	[[ "$$digest" =~ ^sha256:[0-9a-f]{64}$$ ]] || { echo "make image-pin: no digest for $$ref (got '$$digest')" >&2; exit 1; }; \
	sed -i -e "s|^ARG PYTHON_IMAGE=.*|ARG PYTHON_IMAGE=$$ref|" -e "s|^ARG PYTHON_IMAGE_DIGEST=.*|ARG PYTHON_IMAGE_DIGEST=$$digest|" Dockerfile; \
	echo "Dockerfile: base $$ref pinned at $$digest"

lint-docker: install ## hadolint the Dockerfile (no findings allowed)
	$(VENV)/bin/hadolint Dockerfile
