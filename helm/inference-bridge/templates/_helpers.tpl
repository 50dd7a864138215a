{{/* Names and labels. */}}
{{- define "inference-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "inference-bridge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "inference-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "inference-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inference-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "inference-bridge.labels" -}}
helm.sh/chart: {{ include "inference-bridge.chart" . }}
{{ include "inference-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ include "inference-bridge.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: bridge
app.kubernetes.io/part-of: inference-bridge
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "inference-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "inference-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "inference-bridge.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag | trunc 63 }}
{{- end }}

{{- define "inference-bridge.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "inference-bridge.imageTag" .) }}
{{- end }}
{{- end }}

{{/* The settings the chart itself needs, with the service's defaults. */}}
{{- define "inference-bridge.httpPort" -}}
{{- $obs := .Values.config.observability | default dict }}
{{- $port := dig "httpPort" 8080 $obs | int }}
{{- if lt $port 1 }}
{{- fail "config.observability.httpPort must be a fixed port (1-65535) in a pod: probes and the Service point at it" }}
{{- end }}
{{- $port }}
{{- end }}

{{- define "inference-bridge.drainTimeoutSeconds" -}}
{{- $delivery := .Values.config.delivery | default dict }}
{{- dig "drainTimeoutS" 20 $delivery | float64 | ceil | int }}
{{- end }}

{{- define "inference-bridge.terminationGracePeriodSeconds" -}}
{{- $drain := include "inference-bridge.drainTimeoutSeconds" . | int }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain .Values.terminationGraceExtraSeconds }}
{{- else }}
{{- $grace := .Values.terminationGracePeriodSeconds | int }}
{{- if le $grace $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be above the drain timeout config.delivery.drainTimeoutS (%d s): the pod would be killed mid-drain" $grace $drain) }}
{{- end }}
{{- $grace }}
{{- end }}
{{- end }}

{{/*
One setting's value as an environment variable's text: maps as JSON, whole numbers without an exponent
(YAML numbers reach templates as float64, and 16777216 would print as 1.6777216e+07).
*/}}
{{- define "inference-bridge.envValue" -}}
{{- if or (kindIs "map" .) (kindIs "slice" .) }}
{{- toJson . }}
{{- else if kindIs "float64" . }}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/*
The secret settings that can be read from a file, as [variable, key in the Secret] pairs with a key configured.
Usernames are not among them: they are not secrets, and the service has no *_FILE variable for them.
*/}}
{{- define "inference-bridge.secretFiles" -}}
{{- $keys := .Values.secrets.keys }}
{{- $pairs := list }}
{{- range list
      (list "BRIDGE_OPENLAYER__API_KEY" $keys.openlayerApiKey)
      (list "BRIDGE_HUMANLOOP__API_KEY" $keys.humanloopApiKey)
      (list "BRIDGE_KAFKA__SASL_PASSWORD" $keys.kafkaSaslPassword)
      (list "BRIDGE_SCHEMA_REGISTRY__PASSWORD" $keys.schemaRegistryPassword) }}
{{- if index . 1 }}{{ $pairs = append $pairs . }}{{ end }}
{{- end }}
{{- toJson $pairs }}
{{- end }}

{{/*
With secrets.mountAsFiles (the default) the secrets are files of the mounted Secret and the service gets their
paths: the kubelet rewrites the files when the Secret changes, and the service re-reads an API key file when
the API refuses the key, so a rotation needs no restart (an environment variable is frozen at the pod's start).
*/}}
{{- define "inference-bridge.secretEnv" -}}
{{- $secret := .Values.secrets.existingSecret }}
{{- $keys := .Values.secrets.keys }}
{{- $refs := list
      (list "BRIDGE_KAFKA__SASL_USERNAME" $keys.kafkaSaslUsername)
      (list "BRIDGE_SCHEMA_REGISTRY__USERNAME" $keys.schemaRegistryUsername) }}
{{- $files := include "inference-bridge.secretFiles" . | fromJsonArray }}
{{- if .Values.secrets.mountAsFiles }}
{{- range $files }}
- name: {{ index . 0 }}_FILE
  value: {{ printf "%s/%s" (trimSuffix "/" $.Values.secrets.mountPath) (index . 1) | quote }}
{{- end }}
{{- else }}
{{- $refs = concat $files $refs }}
{{- end }}
{{- range $refs }}
{{- if index . 1 }}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ index . 1 }}
{{- end }}
{{- end }}
{{- end }}

{{/* BRIDGE_* variables: one per key of .Values.config, then the secrets, then the TLS file paths. */}}
{{- define "inference-bridge.env" -}}
{{- $config := .Values.config | default dict }}
{{- $kafka := $config.kafka | default dict }}
{{- if not $kafka.bootstrapServers }}
{{- fail "config.kafka.bootstrapServers is required (host:port[,host:port...])" }}
{{- end }}
{{- if not .Values.secrets.existingSecret }}
{{- fail "secrets.existingSecret is required: the name of the Secret that holds the API keys" }}
{{- end }}
{{- if and .Values.kafkaTls.existingSecret (or $kafka.sslCafile $kafka.sslCertfile $kafka.sslKeyfile) }}
{{- fail "set either kafkaTls.existingSecret or config.kafka.ssl*file, not both" }}
{{- end }}
{{- if and .Values.secrets.keys.kafkaSaslUsername $kafka.saslUsername }}
{{- fail "set either secrets.keys.kafkaSaslUsername or config.kafka.saslUsername, not both" }}
{{- end }}
{{- if and .Values.secrets.keys.schemaRegistryUsername (dig "username" "" ($config.schemaRegistry | default dict)) }}
{{- fail "set either secrets.keys.schemaRegistryUsername or config.schemaRegistry.username, not both" }}
{{- end }}
{{- $env := dict }}
{{- range $key, $value := $config }}
{{- if kindIs "map" $value }}
{{- range $field, $v := $value }}
{{- if not (kindIs "invalid" $v) }}
{{- $_ := set $env (printf "BRIDGE_%s__%s" (snakecase $key) (snakecase $field) | upper) (include "inference-bridge.envValue" $v) }}
{{- end }}
{{- end }}
{{- else if not (kindIs "invalid" $value) }}
{{- $_ := set $env (printf "BRIDGE_%s" (snakecase $key) | upper) (include "inference-bridge.envValue" $value) }}
{{- end }}
{{- end }}
{{- with .Values.kafkaTls }}
{{- if .existingSecret }}
{{- if .caKey }}{{ $_ := set $env "BRIDGE_KAFKA__SSL_CAFILE" (printf "%s/%s" .mountPath .caKey) }}{{ end }}
{{- if .certKey }}{{ $_ := set $env "BRIDGE_KAFKA__SSL_CERTFILE" (printf "%s/%s" .mountPath .certKey) }}{{ end }}
{{- if .keyKey }}{{ $_ := set $env "BRIDGE_KAFKA__SSL_KEYFILE" (printf "%s/%s" .mountPath .keyKey) }}{{ end }}
{{- end }}
{{- end }}
{{- range $name, $value := $env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- include "inference-bridge.secretEnv" . }}
{{- end }}

{{/* OpenTelemetry tracing: the standard OTEL_* variables the service reads (nothing when tracing is off). */}}
{{- define "inference-bridge.tracingEnv" -}}
{{- with .Values.tracing }}
{{- if .enabled }}
{{- if not .endpoint }}
{{- fail "tracing.enabled needs tracing.endpoint: the collector's OTLP/HTTP base URL, e.g. http://otel-collector.observability:4318" }}
{{- end }}
{{- $resource := list (printf "k8s.namespace.name=%s" $.Release.Namespace) "k8s.pod.name=$(OTEL_K8S_POD_NAME)" (printf "k8s.deployment.name=%s" (include "inference-bridge.fullname" $)) }}
{{- range $key := keys (.resourceAttributes | default dict) | sortAlpha }}
{{- $resource = append $resource (printf "%s=%s" $key (index $.Values.tracing.resourceAttributes $key)) }}
{{- end }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .serviceName | default (include "inference-bridge.name" $) | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .sampler | quote }}
{{- if not (kindIs "invalid" .samplerArg) }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .samplerArg | toString | quote }}
{{- end }}
- name: OTEL_K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $resource | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Kafka topics the bridge consumes, from config.topics or the service's defaults. */}}
{{- define "inference-bridge.topics" -}}
{{- $t := .Values.config.topics | default dict }}
{{- list (dig "inferences" "inferences" $t) (dig "rowUpdates" "inference-row-updates" $t) (dig "logUpdates" "log-updates" $t) | toJson }}
{{- end }}

{{- define "inference-bridge.metricsSelector" -}}
{{- default (printf "namespace=%q,job=%q" .Release.Namespace (include "inference-bridge.fullname" .)) .Values.prometheusRule.selector }}
{{- end }}
