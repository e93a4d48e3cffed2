"""Kubernetes operator for EPICS IOCs."""

GROUP = "epics-operator.io"
VERSION = "v1alpha1"
KIND = "IOC"
PLURAL = "iocs"
