#!/usr/bin/env bash
# Create the kind cluster (cluster.yaml), build the images of docker/ with docker (the
# operator, the gateways and name server, the example IOCs), load them into the cluster
# and install the Helm chart. Safe to run again: an existing cluster is reused, images
# are rebuilt and reloaded, the release is upgraded.
#
# Needs docker, kind, kubectl, and helm (or Go: then
# testbed/ioc_testbed/kubernetes/build-helm.sh builds helm). Environment: KIND_CLUSTER
# (default ioc-operator), HELM (a helm binary).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cluster=${KIND_CLUSTER:-ioc-operator}
context="kind-$cluster"
chart="$repo/charts/ioc-operator"
registry=ghcr.io/epics-operator
timeout=300s

log() {
    printf '[create.sh] %s\n' "$*" >&2
}

die() {
    log "ERROR: $*"
    exit 1
}

for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found in PATH"
done
helm=${HELM:-$(command -v helm || true)}
if [[ -z $helm ]]; then
    log "no helm in PATH: building it from the Go module proxy"
    helm=$(bash "$repo/testbed/ioc_testbed/kubernetes/build-helm.sh")
fi

# The images carry the chart's appVersion, which is the tag the chart uses by default.
version=$(awk '$1 == "appVersion:" { gsub(/"/, "", $2); print $2 }' "$chart/Chart.yaml")
[[ -n $version ]] || die "no appVersion in $chart/Chart.yaml"

if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    log "reusing kind cluster $cluster"
else
    log "creating kind cluster $cluster"
    kind create cluster --name "$cluster" --config "$here/cluster.yaml" --wait "$timeout"
fi

# docker/<name>.Dockerfile -> $registry/<image>:$version (operator and gateway have
# longer image names; any example-*.Dockerfile keeps its own).
images=()
for dockerfile in "$repo"/docker/*.Dockerfile; do
    name=$(basename "$dockerfile" .Dockerfile)
    case $name in
        operator) image=ioc-operator ;;
        gateway) image=ioc-gateway ;;
        *) image=$name ;;
    esac
    log "building $registry/$image:$version"
    docker build --file "$dockerfile" --build-arg "VERSION=$version" \
        --tag "$registry/$image:$version" "$repo"
    images+=("$registry/$image:$version")
done
log "loading ${#images[@]} images into $cluster"
kind load docker-image --name "$cluster" "${images[@]}"

log "installing the chart (helm release ioc-operator in namespace ioc-system)"
"$helm" upgrade --install ioc-operator "$chart" --kube-context "$context" \
    --namespace ioc-system --create-namespace --wait --timeout "$timeout"
kubectl --context "$context" -n ioc-system rollout status deployment/ioc-operator \
    --timeout="$timeout"
log "ready: next, $here/try.sh"
