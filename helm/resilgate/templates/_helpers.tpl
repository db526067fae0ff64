{{/* Names and labels. */}}
{{- define "resilgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "resilgate.fullname" -}}
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

{{/* The admin Service's name: the fullname cut to leave room for "-admin". */}}
{{- define "resilgate.adminName" -}}
{{- printf "%s-admin" (include "resilgate.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "resilgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "resilgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "resilgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "resilgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: resilgate
{{- end }}

{{- define "resilgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "resilgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "resilgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Where things are in the pod. The image's CMD reads /etc/resilgate/resilgate.yaml; route
tables are under routes/ beside it, admin tokens under admin/.
*/}}
{{- define "resilgate.configDir" -}}/etc/resilgate{{- end }}
{{- define "resilgate.dataDir" -}}/var/lib/resilgate{{- end }}
{{- define "resilgate.metricsDir" -}}/tmp/metrics{{- end }}
{{- define "resilgate.tokensPath" -}}admin/tokens.yaml{{- end }}

{{/* SIGTERM comes after preStop; then readyz says 503 for the notice, then the drain. */}}
{{- define "resilgate.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown }}
{{- add $s.preStopSleepSeconds $s.drainNoticeSeconds $s.drainDeadlineSeconds $s.marginSeconds }}
{{- end }}

{{/* The route tables: the chart's copies of routes/*.yaml, replaced or added by .Values.routes. */}}
{{- define "resilgate.routeFiles" -}}
{{- $files := dict }}
{{- range $path, $_ := .Files.Glob "files/routes/*.yaml" }}
{{- $_ := set $files (base $path) ($.Files.Get $path) }}
{{- end }}
{{- range $name, $text := .Values.routes }}
{{- if $text }}
{{- $_ := set $files $name $text }}
{{- else }}
{{- $_ := unset $files $name }}
{{- end }}
{{- end }}
{{- if not $files }}
{{- fail "routes: no route table left (the chart's files/routes/ and .Values.routes give none)" }}
{{- end }}
{{- toJson $files }}
{{- end }}

{{/* The gateway's main configuration: .Values.config plus what the chart owns. */}}
{{- define "resilgate.mainConfig" -}}
{{- if eq (int .Values.ports.public) (int .Values.ports.admin) }}
{{- fail (printf "ports.admin (%v) equals ports.public: the admin API needs its own port" .Values.ports.admin) }}
{{- end }}
{{- $config := deepCopy .Values.config }}
{{- $listen := dict
      "public" (dict "host" "0.0.0.0" "port" .Values.ports.public)
      "admin" (dict "host" "0.0.0.0" "port" .Values.ports.admin) }}
{{- $_ := set $config "listeners" $listen }}
{{- $_ := set $config "workers" .Values.workers }}
{{- $_ := set $config "drain_notice_s" .Values.shutdown.drainNoticeSeconds }}
{{- $_ := set $config "drain_deadline_s" .Values.shutdown.drainDeadlineSeconds }}
{{- $dataDir := include "resilgate.dataDir" . }}
{{- $state := deepCopy .Values.state.options }}
{{- $_ := set $state "backend" .Values.state.backend }}
{{- if eq .Values.state.backend "sqlite" }}
{{- $_ := set $state "path" (printf "%s/resilgate.db" $dataDir) }}
{{- else }}
{{- if .Values.state.redisSentinel }}
{{- $_ := set $state "redis_sentinel" .Values.state.redisSentinel }}
{{- else }}
{{- $_ := set $state "redis_url" .Values.state.redisUrl }}
{{- end }}
{{- $_ := set $state "spool_path" (printf "%s/journal-spool.db" $dataDir) }}
{{- end }}
{{- $_ := set $config "state" $state }}
{{- if .Values.secrets.adminTokens.name }}
{{- $tokens := printf "%s/%s" (include "resilgate.configDir" .) (include "resilgate.tokensPath" .) }}
{{- $_ := set $config "admin" (dict "tokens_file" $tokens) }}
{{- end }}
{{- $_ := set $config "include_routes" (list "routes/*.yaml") }}
{{- printf "# Written by the resilgate Helm chart from its values: change those, not this.\n" }}
{{- toYaml $config }}
{{- end }}
