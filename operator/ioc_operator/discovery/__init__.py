"""What clients are told: per-IOC client settings and the client directory. Pure."""
