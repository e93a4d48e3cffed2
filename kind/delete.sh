#!/usr/bin/env bash
# Delete the kind cluster that create.sh made (KIND_CLUSTER, default ioc-operator).
set -euo pipefail

cluster=${KIND_CLUSTER:-ioc-operator}
command -v kind >/dev/null 2>&1 || { echo "kind not found in PATH" >&2; exit 1; }
kind delete cluster --name "$cluster"
