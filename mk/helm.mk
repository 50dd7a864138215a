# Helm: the chart's lint and tests need a helm binary. It is a Go module, so `go install` builds it from the
# Go module proxy at a pinned version; the binary lives under .cache/helm/<version>/ and .cache/bin/helm points
# at it, so a second `make helm` does nothing and a version bump builds the new one beside the old.

HELM_VERSION ?= v3.19.0
# The Kubernetes version helm assumes without a cluster (`helm template`, `helm lint`): helm's own release
# build sets it from its client-go (v0.34 for helm v3.19) through these ldflags; a bare `go install` would
# leave v1.20. Same flags as helm's Makefile, so this binary behaves like the released one.
HELM_K8S_MINOR ?= 34
HELM_LDFLAGS := -s -w -X helm.sh/helm/v3/internal/version.version=$(HELM_VERSION) \
	$(foreach pkg,pkg/chartutil pkg/lint/rules,\
	  -X helm.sh/helm/v3/$(pkg).k8sVersionMajor=1 -X helm.sh/helm/v3/$(pkg).k8sVersionMinor=$(HELM_K8S_MINOR))
HELM_DIR := .cache/helm/$(HELM_VERSION)
HELM := .cache/bin/helm
CHART := helm/inference-bridge
CHART_FULL_VALUES := tests/helm/values-full.yaml
# The chart requires these; lint and render with placeholders (no secret values: only Secret names).
HELM_LINT_SET := --set config.kafka.bootstrapServers=kafka:9092 --set secrets.existingSecret=inference-bridge-keys

.PHONY: helm lint-helm

$(HELM_DIR)/helm:
	@command -v go >/dev/null || { echo "make helm: needs Go (https://go.dev) to build helm $(HELM_VERSION)" >&2; exit 1; }
	GOBIN=$(CURDIR)/$(HELM_DIR) CGO_ENABLED=0 go install -trimpath -ldflags '$(HELM_LDFLAGS)' \
	    helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

$(HELM): $(HELM_DIR)/helm
	@mkdir -p $(dir $@)
	ln -sfn ../helm/$(HELM_VERSION)/helm $@

helm: $(HELM) ## build helm (pinned version) with `go install` into .cache/bin; cached

lint-helm: $(HELM) ## helm lint the chart with its default values and with the full set of values
	$(HELM) lint --strict $(CHART) $(HELM_LINT_SET)
	$(HELM) lint --strict $(CHART) -f $(CHART_FULL_VALUES)
