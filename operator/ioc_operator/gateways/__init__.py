"""Sidecar processes that run beside an IOC in sidecar mode (not part of the operator)."""
