"""What IOCs must not share: host ports per node, PV prefixes per namespace. Pure."""
