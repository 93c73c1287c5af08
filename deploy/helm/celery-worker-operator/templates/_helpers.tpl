{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "cwo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects: the release name, plus the chart name unless it already holds it. */}}
{{- define "cwo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "cwo.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "cwo.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "cwo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cwo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The standard labels on every object. */}}
{{- define "cwo.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "cwo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: celery-worker-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "cwo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cwo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespaces served in single-namespace mode, one per line. */}}
{{- define "cwo.namespaces" -}}
{{- range (default (list .Release.Namespace) .Values.watch.namespaces) }}
{{ . }}
{{- end }}
{{- end }}

{{/*
What the operator does to pools and their workers, in every namespace it serves:
kopf watches pools and patches them (finalizer, progress annotations); the reconciler writes
status; the worker Deployment's ownerReference blocks its owner's deletion, which needs update on
pools/finalizers where OwnerReferencesPermissionEnforcement is on; kopf and the reconciler post
Events; the workload reads, creates, patches and scales the Deployment and marks pods with a
deletion cost; urlFrom reads the broker URL from a Secret.
*/}}
{{- define "cwo.poolRules" -}}
- apiGroups: [celery-operator.dev]
  resources: [celeryworkerpools]
  verbs: [list, watch, patch]
- apiGroups: [celery-operator.dev]
  resources: [celeryworkerpools/status]
  verbs: [patch]
- apiGroups: [celery-operator.dev]
  resources: [celeryworkerpools/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [apps]
  resources: [deployments/scale]
  verbs: [patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, patch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}

{{/* kopf's peering: replicas list and watch each other's heartbeats and patch their own. */}}
{{- define "cwo.peeringRules" -}}
- apiGroups: [kopf.dev]
  resources: [{{ .Values.watch.clusterWide | ternary "clusterkopfpeerings" "kopfpeerings" }}]
  verbs: [list, watch, patch, get]
{{- end }}

{{/* `celery-worker-operator run` arguments (tests/deploy/test_chart.py parses them with the real CLI). */}}
{{- define "cwo.args" -}}
{{- if .Values.watch.clusterWide }}
- --all-namespaces
{{- else }}
{{- range (include "cwo.namespaces" . | trim | splitList "\n") }}
- --namespace={{ . }}
{{- end }}
{{- end }}
{{- if .Values.peering.enabled }}
- --peering={{ .Values.peering.name }}
{{- end }}
- --liveness=http://0.0.0.0:{{ .Values.health.port }}/healthz
- --metrics-port={{ .Values.metrics.port }}
- --log-level={{ .Values.logLevel }}
- --log-format={{ .Values.logFormat }}
{{- with (.Values.workerTemplatePolicy | default dict).allow }}
- --allow-template={{ join "," . }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Where `helm test` finds the operator's /healthz: the Service's health port unless tests.healthzUrl says. */}}
{{- define "cwo.healthzUrl" -}}
{{- .Values.tests.healthzUrl | default (printf "http://%s-metrics.%s.svc:%d/healthz" (include "cwo.fullname" .) .Release.Namespace (int .Values.health.port)) }}
{{- end }}
