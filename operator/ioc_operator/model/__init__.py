"""The IOC model: the custom resource (the CRD's source), its rules, the operator's settings."""
