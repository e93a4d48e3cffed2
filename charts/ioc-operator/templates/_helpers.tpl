{{/* Chart name, truncated to a DNS label. */}}
{{- define "ioc-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name, plus the chart name unless it already has it. */}}
{{- define "ioc-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ioc-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ioc-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ioc-operator.labels" -}}
{{ include "ioc-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: epics
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "ioc-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ioc-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ioc-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "ioc-operator.gatewayImage" -}}
{{- printf "%s:%s" .Values.gateway.image.repository (default .Chart.AppVersion .Values.gateway.image.tag) -}}
{{- end -}}

{{/* Fail early on values the schema cannot express. */}}
{{- define "ioc-operator.validate" -}}
{{- if and (eq .Values.rbac.scope "namespaced") (empty .Values.watchNamespaces) -}}
{{- fail "rbac.scope=namespaced needs watchNamespaces (the namespaces to grant and watch)" -}}
{{- end -}}
{{- if gt (int .Values.hostPorts.min) (int .Values.hostPorts.max) -}}
{{- fail "hostPorts.min must not exceed hostPorts.max" -}}
{{- end -}}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.liveness.port)) -}}
{{- fail "metrics.port must differ from liveness.port (both are the operator's)" -}}
{{- end -}}
{{- if and .Values.metrics.enabled (has (int .Values.metrics.nameServerPort) (list 5064 5075 5076)) -}}
{{- fail "metrics.nameServerPort must not be one of the name server's EPICS ports (5064, 5075, 5076)" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" -}}
{{- end -}}
{{- end -}}

{{/*
What the operator does in the namespaces of its IOCs: exactly the verbs it uses (the
chart's tests record every request it makes against a real API server).
*/}}
{{- define "ioc-operator.namespacedRules" -}}
# IOCs: kopf lists and watches them and patches its annotations and finalizer (the
# probe daemon's); the operator reads one before writing status and patches an
# annotation to make both sides of a host-port clash reconcile.
- apiGroups: [epics-operator.io]
  resources: [iocs]
  verbs: [get, list, watch, patch]
- apiGroups: [epics-operator.io]
  resources: [iocs/status]
  verbs: [patch]
# Owner references with blockOwnerDeletion on the objects below (the
# OwnerReferencesPermissionEnforcement admission plugin checks this).
- apiGroups: [epics-operator.io]
  resources: [iocs/finalizers]
  verbs: [update]
# Server-side apply of what an IOC renders: a PATCH (dry run first), authorized as
# create too while the object does not exist yet. kopf watches the StatefulSets,
# Services, ConfigMaps and NetworkPolicies; Services, ConfigMaps and NetworkPolicies
# that an IOC no longer renders are pruned, and a namespace's client directory
# ConfigMap goes with its last IOC.
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [list, watch, create, patch]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [list, watch, create, patch, delete]
# The ConfigMap an IOC's spec.config.configMap names: its content hash rolls the IOC.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get]
# The optional NetworkPolicy of an IOC with network.allowedNamespaces: the same.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, watch, create, patch, delete]
# The autosave volume: applied, never deleted (it outlives the IOC).
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [create, patch]
# The IOC's pod: its node and host IP.
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
# kopf posts condition changes as events on the IOC.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}

{{/* Cluster-scoped reads: a host-mode IOC's address is its node's InternalIP. */}}
{{- define "ioc-operator.clusterRules" -}}
- apiGroups: [""]
  resources: [nodes]
  verbs: [get]
# The cluster's Service range: IOC Services get ClusterIPs derived from their names.
- apiGroups: [networking.k8s.io]
  resources: [servicecidrs]
  verbs: [get]
# kopf watches CustomResourceDefinitions to notice the IOC CRD (re)installed.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end -}}

{{/* On the metrics Services: what the ServiceMonitor selects. */}}
{{- define "ioc-operator.metricsLabel" -}}
epics-operator.io/metrics: "true"
{{- end -}}
