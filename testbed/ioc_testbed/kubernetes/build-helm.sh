#!/usr/bin/env bash
# Build (or reuse) Helm v3 from the Go module proxy with `go install`.
#
# Usage:
#   build-helm.sh             build or reuse helm; prints the binary's path last on stdout
#   build-helm.sh --version   print the pinned Helm version
#
# The binary goes to ${XDG_CACHE_HOME:-$HOME/.cache}/ioc-operator/helm-<version>/helm
# (IOC_OPERATOR_CACHE overrides the ioc-operator part), never into the repository.
# A cold build takes a few minutes on 2 cores; later runs reuse the binary at once.
set -euo pipefail

readonly helm_version=v3.22.0
readonly lock_timeout_s=1800
readonly cache="${IOC_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ioc-operator}"
readonly bindir="$cache/helm-$helm_version"
readonly helm="$bindir/helm"

log() {
    printf '[build-helm.sh] %s\n' "$*" >&2
}

die() {
    log "ERROR: $*"
    exit 1
}

# The binary answers with the pinned version (a half-written file does not: it is
# built elsewhere and moved in).
usable() {
    [[ -x $helm ]] && [[ $("$helm" version --template '{{.Version}}' 2>/dev/null </dev/null) == "$helm_version" ]]
}

main() {
    case ${1:-} in
        --version)
            echo "$helm_version"
            return
            ;;
        "") ;;
        *) die "unknown argument: $1 (try --version)" ;;
    esac

    if ! usable; then
        command -v go >/dev/null 2>&1 || die "go not found in PATH (needed to build helm)"
        mkdir -p "$bindir"
        # Serialise concurrent runs: the second one waits, then reuses the first's binary.
        exec 9>"$bindir.lock"
        flock -w "$lock_timeout_s" 9 || die "timed out waiting for $bindir.lock"
        if ! usable; then
            local tmp started=$SECONDS
            tmp=$(mktemp -d "$bindir.tmp.XXXXXX")
            # shellcheck disable=SC2064  # expand $tmp now
            trap "rm -rf '$tmp'" EXIT
            log "go install helm.sh/helm/v3/cmd/helm@$helm_version with $(go version)"
            # Stamp the version and the default Kubernetes version (the one of its
            # client-go, as Helm's Makefile does; else `helm template` assumes v1.20).
            local gomod client_go major minor ldflags
            gomod=$(cd "$tmp" && go mod download -json "helm.sh/helm/v3@$helm_version" </dev/null |
                sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
            [[ -f $gomod ]] || die "could not download helm.sh/helm/v3@$helm_version"
            client_go=$(awk '$1 == "k8s.io/client-go" && $2 ~ /^v0\./ { print $2; exit }' "$gomod")
            [[ $client_go =~ ^v0\.([0-9]+)\. ]] || die "no k8s.io/client-go v0.Y.Z in $gomod"
            major=1
            minor=${BASH_REMATCH[1]}
            ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
            local pkg
            for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
                ldflags+=" -X $pkg.k8sVersionMajor=$major -X $pkg.k8sVersionMinor=$minor"
            done
            GOBIN="$tmp" CGO_ENABLED=0 go install -trimpath -ldflags "$ldflags" \
                "helm.sh/helm/v3/cmd/helm@$helm_version" </dev/null
            mv -f "$tmp/helm" "$helm"
            rm -rf "$tmp"
            trap - EXIT
            log "built in $((SECONDS - started))s"
            usable || die "$helm does not report $helm_version"
        fi
        exec 9>&-
    fi
    echo "$helm"
}

main "$@"
