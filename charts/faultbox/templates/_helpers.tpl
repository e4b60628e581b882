{{- define "faultbox.name" -}}faultbox-operator{{- end -}}
{{- define "faultbox.labels" -}}
app.kubernetes.io/name: {{ include "faultbox.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
{{- define "faultbox.rules" -}}
- apiGroups: ["faultbox.io"]
  resources: ["faulttests"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["faultbox.io"]
  resources: ["faulttests/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
