# Prometheus and promtool, for the tests that prove the chart's dashboard and alerts on a real Prometheus
# (tests/integration/test_prometheus.py) and unit-test the alerts with `promtool test rules` (tests/promtool/).
# Like helm, a Go module built with `go install` from the Go module proxy at a pinned version; the binaries live
# under .cache/prometheus/<version>/ and .cache/bin/{prometheus,promtool} point at them, so a second run does
# nothing. Prometheus 3.x's Go module versions are v0.3MM.P for release 3.MM.P (v0.316.0 is 3.16.0).
# `make test` depends on `prometheus` (at the end of this file): the tests find the binaries in .cache/bin, or at
# PROMETHEUS_BIN / PROMTOOL_BIN when those are set; they never skip.

PROMETHEUS_VERSION ?= v0.316.0
PROMETHEUS_RELEASE := $(patsubst v0.3%,3.%,$(PROMETHEUS_VERSION))
PROMETHEUS_DIR := .cache/prometheus/$(PROMETHEUS_VERSION)
# remove_all_sd leaves out the service discoveries (AWS, Azure, GCE, ...; promtool keeps Kubernetes' for its own
# commands): the tests scrape a static target, and it halves the build (1.1 instead of 1.9 GB of modules, about
# 5 instead of 10 CPU-minutes from empty Go caches, 52 MB binaries instead of 105). The web UI's assets are not
# embedded (that needs npm); the HTTP API the tests use is all there.
PROMETHEUS_TAGS := remove_all_sd
PROMETHEUS_LDFLAGS := -s -w -X github.com/prometheus/common/version.Version=$(PROMETHEUS_RELEASE) \
	-X github.com/prometheus/common/version.Branch=go-install \
	-X github.com/prometheus/common/version.Revision=$(PROMETHEUS_VERSION)

.PHONY: prometheus

$(PROMETHEUS_DIR)/prometheus $(PROMETHEUS_DIR)/promtool &:
	@command -v go >/dev/null || { echo "make prometheus: needs Go (https://go.dev) to build Prometheus $(PROMETHEUS_RELEASE)" >&2; exit 1; }
	GOBIN=$(CURDIR)/$(PROMETHEUS_DIR) CGO_ENABLED=0 go install -trimpath -tags '$(PROMETHEUS_TAGS)' \
	    -ldflags '$(PROMETHEUS_LDFLAGS)' \
	    github.com/prometheus/prometheus/cmd/prometheus@$(PROMETHEUS_VERSION) \
	    github.com/prometheus/prometheus/cmd/promtool@$(PROMETHEUS_VERSION)

.cache/bin/prometheus: $(PROMETHEUS_DIR)/prometheus
.cache/bin/promtool: $(PROMETHEUS_DIR)/promtool
.cache/bin/prometheus .cache/bin/promtool:
	@mkdir -p $(dir $@)
	ln -sfn ../prometheus/$(PROMETHEUS_VERSION)/$(notdir $@) $@

prometheus: .cache/bin/prometheus .cache/bin/promtool ## build Prometheus and promtool (pinned) with `go install` into .cache/bin; cached

# Both PROMETHEUS_BIN and PROMTOOL_BIN set (e.g. to Debian's /usr/bin/prometheus and /usr/bin/promtool, from
# `apt-get install --no-install-recommends prometheus`): `make test` uses them and builds nothing.
ifeq ($(and $(PROMETHEUS_BIN),$(PROMTOOL_BIN)),)
test: prometheus
endif
