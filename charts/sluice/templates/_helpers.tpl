{{- define "sluice.fullname" -}}
{{- if contains "sluice" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-sluice" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sluice.labels" -}}
app.kubernetes.io/name: sluice-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: sluice
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: sluice-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sluice.webhookService" -}}
{{- printf "%s-webhook" (include "sluice.fullname" .) -}}
{{- end -}}
{{- define "sluice.webhookConfig" -}}
{{- printf "%s-sidecar-injector" (include "sluice.fullname" .) -}}
{{- end -}}
{{- define "sluice.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "sluice.fullname" .) -}}
{{- end -}}
{{- define "sluice.lease" -}}
{{- printf "%s-leader" (include "sluice.fullname" .) -}}
{{- end -}}
{{- define "sluice.tokenReviewBinding" -}}
{{- printf "%s-broker-token-review" (include "sluice.fullname" .) -}}
{{- end -}}
{{- define "sluice.dataPlaneCaSecret" -}}
{{- printf "%s-data-plane-ca" (include "sluice.fullname" .) -}}
{{- end -}}
