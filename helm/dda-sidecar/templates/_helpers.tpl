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

{{/* The webhook pod's labels as one map, so no key appears twice (strict YAML parsers such as
     Flux's and kustomize's reject duplicates). Earlier maps win: the selector labels (the
     Deployment must select its pods) and the opt-out (the webhook never injects itself). */}}
{{- define "dda.podLabels" -}}
{{- $selector := include "dda.selectorLabels" . | fromYaml -}}
{{- $common := include "dda.labels" . | fromYaml -}}
{{- $optOut := dict "dda-sidecar.io/inject" "false" -}}
{{- toYaml (merge $selector $optOut (deepCopy (default dict .Values.webhook.podLabels)) $common) -}}
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

{{- define "dda.csiImage" -}}{{ include "dda.imageRef" (list . .Values.csi.image) }}{{- end -}}

{{- define "dda.registrarImage" -}}
{{- $img := .Values.csi.registrar.image -}}
{{- if $img.digest -}}
{{- printf "%s:%s@%s" $img.repository $img.tag $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository $img.tag -}}
{{- end -}}
{{- end -}}

{{/* The node plugin and the CSIDriver are rendered in csi mode unless installed elsewhere. */}}
{{- define "dda.csiNode" -}}
{{- if and (eq .Values.sidecar.mode "csi") .Values.csi.enabled -}}true{{- end -}}
{{- end -}}

{{- define "dda.csiSelectorLabels" -}}
app.kubernetes.io/name: {{ include "dda.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: csi-node
{{- end -}}

{{/* The node plugin pod's labels as one map (see dda.podLabels). */}}
{{- define "dda.csiPodLabels" -}}
{{- $selector := include "dda.csiSelectorLabels" . | fromYaml -}}
{{- $common := include "dda.labels" . | fromYaml -}}
{{- $optOut := dict "dda-sidecar.io/inject" "false" -}}
{{- toYaml (merge $selector $optOut (deepCopy (default dict .Values.csi.podLabels)) $common) -}}
{{- end -}}
