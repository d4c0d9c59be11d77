{{- define "cellplane-router.fullname" -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}-cellplane-router{{- end -}}
{{- define "cellplane-router.selector" -}}
app.kubernetes.io/name: cellplane-router
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "cellplane-router.labels" -}}
{{ include "cellplane-router.selector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "cellplane-router.adminSecret" -}}{{ .Values.admin.existingSecret | default (printf "%s-admin" (include "cellplane-router.fullname" .)) }}{{- end -}}
{{- define "cellplane-router.config" -}}
listen: 0.0.0.0:8080
metricsListen: 0.0.0.0:9090
keys: {{- toYaml .Values.keys | nindent 2 }}
noKey: {{ .Values.noKey }}
table:
  etcd:
    endpoints: {{- toYaml .Values.table.etcd.endpoints | nindent 6 }}
    platform: {{ .Values.table.platform }}
  cacheFile: /var/cache/cellplane/table.json
timeouts: {{- toYaml .Values.timeouts | nindent 2 }}
limits: {{- toYaml .Values.limits | nindent 2 }}
{{- if .Values.tls.secretName }}
tls: {certFile: /etc/cellplane/tls/tls.crt, keyFile: /etc/cellplane/tls/tls.key}
{{- end }}
{{- if .Values.admin.enabled }}
admin:
  listen: "0.0.0.0:{{ .Values.admin.port }}"
  tokenFile: /etc/cellplane/admin/token
  {{- if .Values.admin.mtls.secretName }}
  tls: {certFile: /etc/cellplane/admin-tls/tls.crt, keyFile: /etc/cellplane/admin-tls/tls.key, clientCaFile: /etc/cellplane/admin-tls/ca.crt}
  {{- end }}
{{- end }}
{{- end -}}
