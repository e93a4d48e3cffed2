"""The operator: kopf handlers, reconcile, the Kubernetes API, the state it keeps."""
