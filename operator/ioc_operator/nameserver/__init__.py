"""ioc-name-server: one address that answers CA and PVA name searches for many IOCs.

Clients list only the name server; each answer names the IOC (or its sidecar gateway)
that holds the PV, so clients connect straight to it and the name server is never in
the data path. See docs/name-server.md.

Modules: ``ca`` and ``pva`` (sans-I/O search framing), ``table`` (the IOCs),
``resolver`` (which IOC holds a name, with bounded caches), ``probe`` (confirmation
searches sent to IOCs), ``server`` (the listeners), ``kubewatch`` and ``tablefile``
(where the table comes from), ``main`` (the command).
"""
