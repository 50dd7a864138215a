# inference-bridge image: `make image` builds it (docker or podman), `make lint-docker` lints it.
#
# builder: a venv with the hash-pinned dependencies of requirements.lock (`make lock`), then the service's
#          own wheel without dependencies, built offline with the hash-pinned setuptools from the same lock.
# runtime: the venv and the Avro schemas on the same slim Python, as UID/GID 10001, nothing else. Bytecode is
#          compiled at install time and nothing is written at run time, so it runs on a read-only root
#          filesystem; the chart mounts an emptyDir on /tmp for anything a library may want to put there.
#
# The base is pinned by digest: `make image-pin` resolves PYTHON_IMAGE's current digest and rewrites the two
# lines below (the one-command bump). An empty digest builds from the tag alone, and `make image` warns.
# No `# syntax=` line: the file needs no BuildKit frontend image (another unpinned pull), and buildah reads it too.

ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm
ARG PYTHON_IMAGE_DIGEST=
# <image>@<digest> when pinned, else <image>.
ARG PYTHON_BASE=${PYTHON_IMAGE}${PYTHON_IMAGE_DIGEST:+@}${PYTHON_IMAGE_DIGEST}

FROM ${PYTHON_BASE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Dependencies first, so editing the service does not reinstall them. Wheels only: the slim image has no
# compiler, and every pinned package ships wheels for CPython 3.11 on amd64 and arm64.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: --no-deps -r requirements.lock

COPY pyproject.toml ./
COPY service/ service/
# No index, no isolation: the build backend is the setuptools just installed from the lock, so nothing
# unpinned is downloaded. Then the packaging tools leave the venv: the runtime image installs nothing.
RUN pip install --no-cache-dir --no-deps --no-index --no-build-isolation . \
    && pip uninstall --yes setuptools pip


FROM ${PYTHON_BASE} AS runtime

# A fixed, numeric UID/GID so Kubernetes can check runAsNonRoot and volumes can be owned by it.
RUN groupadd --system --gid 10001 bridge \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin bridge

COPY --from=builder /opt/venv /opt/venv
COPY schemas/ /app/schemas/

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    BRIDGE_SCHEMAS_DIR=/app/schemas

WORKDIR /app
USER 10001:10001
# GET /metrics, /livez, /readyz (BRIDGE_OBSERVABILITY__HTTP_PORT, 8080 unless set).
EXPOSE 8080
# Liveness is the orchestrator's job (the chart's probes); SIGTERM drains in-flight calls, then commits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]

# Last, so a new build date or revision changes only this metadata layer: the layers above (and the whole
# builder stage) come from the cache. Build args are in scope only after their ARG line, so none above uses them.
ARG PYTHON_IMAGE
ARG PYTHON_IMAGE_DIGEST
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="inference-bridge" \
      org.opencontainers.image.description="Kafka (Avro) to Openlayer and Humanloop HTTP APIs: commit after success, dead-letter on error." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}" \
      org.opencontainers.image.base.digest="${PYTHON_IMAGE_DIGEST}"
