{{/* The name service (ioc-name-server): names, labels, image, address, scope. */}}

{{- define "ioc-operator.nameServer.fullname" -}}
{{- printf "%s-name-server" (include "ioc-operator.fullname" . | trunc 51 | trimSuffix "-") -}}
{{- end -}}

{{/* Not the operator's selector labels: its Deployment must not select these pods. */}}
{{- define "ioc-operator.nameServer.selectorLabels" -}}
app.kubernetes.io/name: ioc-name-server
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ioc-operator.nameServer.labels" -}}
{{ include "ioc-operator.nameServer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: name-server
app.kubernetes.io/part-of: epics
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The gateway image carries ioc-name-server (the ioc-operator package). */}}
{{- define "ioc-operator.nameServer.image" -}}
{{- $image := .Values.nameService.image -}}
{{- printf "%s:%s" (default .Values.gateway.image.repository $image.repository) (default (default .Chart.AppVersion .Values.gateway.image.tag) $image.tag) -}}
{{- end -}}

{{/*
The address the client directories publish: nameService.address, else the pinned
ClusterIP, else the Service's DNS name (resolved by clients when they start).
*/}}
{{- define "ioc-operator.nameServer.address" -}}
{{- if .Values.nameService.address -}}
{{- .Values.nameService.address -}}
{{- else if .Values.nameService.clusterIP -}}
{{- .Values.nameService.clusterIP -}}
{{- else -}}
{{- printf "%s.%s.svc" (include "ioc-operator.nameServer.fullname" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* The IOC namespaces it answers for: its own list, else the operator's. */}}
{{- define "ioc-operator.nameServer.namespaces" -}}
{{- toJson (default .Values.watchNamespaces .Values.nameService.namespaces) -}}
{{- end -}}
