{{/* Names */}}
{{- define "dda.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dda.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dda.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "dda.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "dda.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dda.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end -}}

{{/* repository[:tag][@digest] from an image dict, falling back to .Values.image and appVersion */}}
{{- define "dda.imageRef" -}}
{{- $root := index . 0 -}}
{{- $img := merge (deepCopy (index . 1)) (deepCopy $root.Values.image) -}}
{{- $tag := default $root.Chart.AppVersion $img.tag -}}
{{- if $img.digest -}}
{{- printf "%s:%s@%s" $img.repository $tag $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "dda.image" -}}{{ include "dda.imageRef" (list . dict) }}{{- end -}}
{{- define "dda.sidecarImage" -}}{{ include "dda.imageRef" (list . .Values.sidecar.image) }}{{- end -}}

{{- define "dda.tlsSecretName" -}}
{{- if eq .Values.tls.mode "secret" -}}
{{- required "tls.secretName is required when tls.mode is secret" .Values.tls.secretName -}}
{{- else -}}
{{- printf "%s-tls" (include "dda.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "dda.serviceHost" -}}
{{- printf "%s.%s.svc" (include "dda.fullname" .) .Release.Namespace -}}
{{- end -}}
