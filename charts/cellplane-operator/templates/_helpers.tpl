{{- define "cellplane-operator.name" -}}cellplane-operator{{- end -}}
{{- define "cellplane-operator.fullname" -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}-cellplane-operator{{- end -}}
{{- define "cellplane-operator.selector" -}}
app.kubernetes.io/name: cellplane-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "cellplane-operator.labels" -}}
{{ include "cellplane-operator.selector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "cellplane-operator.rbacKind" -}}{{ if .Values.watchNamespace }}Role{{ else }}ClusterRole{{ end }}{{- end -}}
