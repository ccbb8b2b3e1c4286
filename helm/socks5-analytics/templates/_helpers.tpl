{{/* Chart name. */}}
{{- define "s5a.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: <release>-<chart>, or the release alone when it has the chart name. */}}
{{- define "s5a.fullname" -}}
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

{{/* Common labels; call with (dict "ctx" $ "component" "proxy"). */}}
{{- define "s5a.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{ include "s5a.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: socks5-analytics
{{- end }}

{{- define "s5a.selectorLabels" -}}
app.kubernetes.io/name: {{ include "s5a.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Image reference; call with (dict "ctx" $ "image" .Values.image.proxy). */}}
{{- define "s5a.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "s5a.policySecret" -}}
{{- default (printf "%s-policy" (include "s5a.fullname" .)) .Values.policy.secretName }}
{{- end }}

{{- define "s5a.databaseSecret" -}}
{{- if .Values.postgresql.enabled }}
{{- printf "%s-postgresql" (include "s5a.fullname" .) }}
{{- else }}
{{- required "database.external.secretName is required when postgresql.enabled is false" .Values.database.external.secretName }}
{{- end }}
{{- end }}

{{- define "s5a.databaseKey" -}}
{{- if .Values.postgresql.enabled }}url{{ else }}{{ .Values.database.external.secretKey }}{{ end }}
{{- end }}

{{/* The env of every component: log level, config file and the database URL. */}}
{{- define "s5a.commonEnv" -}}
- name: S5A_LOG__LEVEL
  value: {{ .Values.logLevel | quote }}
- name: S5A_LOG__FORMAT
  value: json
- name: S5A_NODE_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}

{{- define "s5a.databaseEnv" -}}
- name: S5A_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ include "s5a.databaseSecret" . }}
      key: {{ include "s5a.databaseKey" . }}
{{- end }}

{{/* The config file volume and mount, and the writable /tmp a read-only root needs. */}}
{{- define "s5a.configVolumes" -}}
- name: config
  configMap:
    name: {{ include "s5a.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- end }}

{{- define "s5a.configMounts" -}}
- name: config
  mountPath: /etc/socks5-analytics
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Pod annotations that roll the pods when their configuration changes. */}}
{{- define "s5a.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if .Values.tracing.enabled }}
checksum/otel: {{ include (print .Template.BasePath "/otel-configmap.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/* The OpenTelemetry Collector sidecar (receives OTLP on localhost, forwards). */}}
{{- define "s5a.otelSidecar" -}}
- name: otel-collector
  image: {{ .Values.tracing.image }}
  args: ["--config=/etc/otelcol/config.yaml"]
  ports:
    - {name: otlp, containerPort: 4317, protocol: TCP}
  resources: {{- toYaml .Values.tracing.resources | nindent 4 }}
  securityContext: {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: otel-config
      mountPath: /etc/otelcol
      readOnly: true
{{- end }}

{{- define "s5a.otelVolume" -}}
- name: otel-config
  configMap:
    name: {{ include "s5a.fullname" . }}-otel
{{- end }}

{{- define "s5a.collectorAddress" -}}
{{- printf "%s-collector:50051" (include "s5a.fullname" .) }}
{{- end }}

{{/* The schema, before the API or the collector starts: `migrate upgrade` in an init
container of their pods. Not a Helm hook: a post-install hook runs only after `helm install
--wait` (or Flux, Argo CD) saw every pod ready, and the API is not ready before the schema
is there. Migrations hold a database lock, so pods starting together wait for each other;
at the head revision it only checks. An init container that finds no database yet (the
bundled one still starting) fails and is restarted by the kubelet until it can. */}}
{{- define "s5a.migrateInit" -}}
{{- if .Values.migrations.enabled }}
initContainers:
  - name: migrate
    image: {{ include "s5a.image" (dict "ctx" . "image" .Values.image.app) }}
    imagePullPolicy: {{ .Values.image.app.pullPolicy }}
    args: ["migrate", "upgrade"]
    env:
      {{- include "s5a.commonEnv" . | nindent 6 }}
      {{- include "s5a.databaseEnv" . | nindent 6 }}
    resources:
      requests: {cpu: 50m, memory: 128Mi}
      limits: {memory: 256Mi}
    securityContext: {{- toYaml .Values.securityContext | nindent 6 }}
    volumeMounts:
      - {name: tmp, mountPath: /tmp}
{{- end }}
{{- end }}

{{/* The proxy -> collector link's token and TLS: the collector's side. */}}
{{- define "s5a.collectorServerEnv" -}}
{{- with .Values.collector.tokenSecret }}
- name: S5A_COLLECTOR__TOKEN
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: token}
{{- end }}
{{- if .Values.collector.tls.secretName }}
- name: S5A_COLLECTOR__TLS__ENABLED
  value: "true"
- name: S5A_COLLECTOR__TLS__CERT_FILE
  value: /etc/socks5-analytics/tls/tls.crt
- name: S5A_COLLECTOR__TLS__KEY_FILE
  value: /etc/socks5-analytics/tls/tls.key
{{- end }}
{{- end }}

{{/* ...and the proxies' side: the same token, and the CA that signed the collectors'
certificate (the Secret's ca.crt). */}}
{{- define "s5a.collectorClientEnv" -}}
{{- with .Values.collector.tokenSecret }}
- name: S5A_PROXY__EVENTS__TOKEN
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: token}
{{- end }}
{{- if .Values.collector.tls.secretName }}
- name: S5A_PROXY__EVENTS__TLS__ENABLED
  value: "true"
- name: S5A_PROXY__EVENTS__TLS__CA_FILE
  value: /etc/socks5-analytics/tls/ca.crt
{{- with .Values.collector.tls.serverName }}
- name: S5A_PROXY__EVENTS__TLS__SERVER_NAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Where the TLS Secret's files appear, on either side. */}}
{{- define "s5a.collectorTlsMount" -}}
{{- if .Values.collector.tls.secretName }}
- name: collector-tls
  mountPath: /etc/socks5-analytics/tls
  readOnly: true
{{- end }}
{{- end }}

{{/* The TLS Secret as a volume for one side: `keys` are the Secret's keys it needs (the
proxies never get the private key). */}}
{{- define "s5a.collectorTlsVolume" -}}
{{- if .ctx.Values.collector.tls.secretName }}
- name: collector-tls
  secret:
    secretName: {{ .ctx.Values.collector.tls.secretName }}
    items:
      {{- range .keys }}
      - {key: {{ . }}, path: {{ . }}}
      {{- end }}
{{- end }}
{{- end }}
