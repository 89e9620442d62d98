{{/* Names, labels and shared pieces of the chart's objects. */}}

{{- define "atm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "atm.fullname" -}}
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

{{- define "atm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "atm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: daemon
{{- end }}

{{- define "atm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "atm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "atm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "atm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret the daemon reads: an existing one, or the chart's own (empty when none). */}}
{{- define "atm.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else if .Values.secrets.create }}
{{- include "atm.fullname" . }}
{{- end }}
{{- end }}

{{- define "atm.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.embeddedModel.enabled }}
{{- $tag = printf "%s%s" $tag .Values.embeddedModel.imageTagSuffix }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Secret keys: the environment variable each one sets. */}}
{{- define "atm.secretKeys" -}}
ATM_SIGNING_KEY: signingKey
OPENAI_API_KEY: openaiApiKey
MLFLOW_TRACKING_USERNAME: mlflowTrackingUsername
MLFLOW_TRACKING_PASSWORD: mlflowTrackingPassword
MLFLOW_TRACKING_TOKEN: mlflowTrackingToken
WANDB_API_KEY: wandbApiKey
{{- end }}

{{- define "atm.rulesSet" -}}
{{- range $key, $value := .Values.rules }}{{ if not (kindIs "invalid" $value) }}{{ $key }} {{ end }}{{ end }}
{{- end }}
