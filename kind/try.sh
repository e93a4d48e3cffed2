#!/usr/bin/env bash
# Apply examples/*.yaml, wait for the IOCs, then read a PV of each over CA and PVA from
# a client pod that knows nothing but the published client settings
# (envFrom: configMapRef epics-client-env).
#
# Usage: try.sh [IOC=PV ...]   the PV to read per IOC (default: its spec.probe.pv)
# Environment: KIND_CLUSTER (default ioc-operator), NS (default epics-demo).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cluster=${KIND_CLUSTER:-ioc-operator}
context="kind-$cluster"
ns=${NS:-epics-demo}
wait_s=300
client=epics-try-client

k() {
    kubectl --context "$context" "$@"
}

log() {
    printf '[try.sh] %s\n' "$*" >&2
}

declare -A pv_of=()
for arg in "$@"; do
    [[ $arg == *=* ]] || { log "usage: $0 [IOC=PV ...]"; exit 2; }
    pv_of[${arg%%=*}]=${arg#*=}
done

version=$(awk '$1 == "appVersion:" { gsub(/"/, "", $2); print $2 }' \
    "$repo/charts/ioc-operator/Chart.yaml")
image="ghcr.io/epics-operator/ioc-gateway:$version"  # has caproto and p4p

k create namespace "$ns" --dry-run=client -o yaml | k apply -f - >/dev/null
for manifest in "$repo"/examples/*.yaml; do
    # The host-mode example is pinned to a node by name: use a kind worker.
    sed -E "s/^([[:space:]]*nodeName:).*/\1 $cluster-worker/" "$manifest" |
        k -n "$ns" apply -f -
done

log "waiting up to ${wait_s}s for the IOCs to be Ready"
k -n "$ns" wait --for=condition=Ready iocs --all --timeout="${wait_s}s" ||
    log "not all IOCs are Ready (see below); reading what can be read"
k -n "$ns" get iocs

items=()
while IFS='|' read -r name pv ca pva; do
    [[ -n $name ]] || continue
    items+=("$name|${pv_of[$name]:-$pv}|$ca|$pva")
done < <(k -n "$ns" get iocs -o jsonpath='{range .items[*]}{.metadata.name}{"|"}{.spec.probe.pv}{"|"}{.spec.servers.ca.enabled}{"|"}{.spec.servers.pva.enabled}{"\n"}{end}')

k -n "$ns" create configmap "$client" --from-file=read-pvs.py="$here/read-pvs.py" \
    --dry-run=client -o yaml | k apply -f - >/dev/null
k -n "$ns" delete pod "$client" --ignore-not-found --wait=true --timeout=60s >/dev/null
k -n "$ns" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: $client
spec:
  restartPolicy: Never
  securityContext: {runAsNonRoot: true, runAsUser: 65532}
  containers:
    - name: client
      image: $image
      imagePullPolicy: IfNotPresent
      command: [python, /try/read-pvs.py]
      envFrom:
        - configMapRef: {name: epics-client-env}   # all this pod knows about the IOCs
      env:
        - {name: TRY_ITEMS, value: "${items[*]}"}
      volumeMounts:
        - {name: script, mountPath: /try, readOnly: true}
  volumes:
    - name: script
      configMap: {name: $client}
YAML

log "reading from pod $client (on the pod network, without broadcast)"
phase=Pending
deadline=$((SECONDS + 180))
while ((SECONDS < deadline)); do
    phase=$(k -n "$ns" get pod "$client" -o jsonpath='{.status.phase}')
    [[ $phase == Succeeded || $phase == Failed ]] && break
    sleep 2
done
k -n "$ns" logs "$client" || true
case $phase in
    Succeeded) log "every PV read" ;;
    Failed) log "some reads failed (above)"; exit 1 ;;
    *) log "the client pod did not finish within 180s (phase $phase)"; exit 1 ;;
esac
