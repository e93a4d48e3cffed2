#!/usr/bin/env bash
# Build a real Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl) and etcd from the Go module proxy, using the wrapper module
# in this directory (go.mod pins k8s.io/kubernetes and replaces its staging modules).
#
# Usage:
#   build.sh                 build (or reuse) the binaries; prints the bin dir last on stdout
#   build.sh --version       print the pinned Kubernetes version
#   build.sh --pin vX.Y.Z    regenerate go.mod/go.sum for another Kubernetes release
#
# Binaries go to ${IOC_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ioc-operator}/
# kubernetes-vX.Y.Z/bin (never into the repository). Binaries already there are reused.
# If KUBEBUILDER_ASSETS names a directory, binaries found there are used and only the
# missing ones are built; a directory of symlinks combining both is printed then.
# GOMODCACHE/GOCACHE keep their defaults so CI caches can reuse them.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly here
readonly binaries=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy etcd)
readonly lock_timeout_s=5400
t0=$(date +%s)

log() {
    printf '[build.sh +%4ss] %s\n' "$(($(date +%s) - t0))" "$*" >&2
}

die() {
    log "ERROR: $*"
    exit 1
}

# Go package for each binary name.
package_of() {
    case $1 in
        etcd) echo go.etcd.io/etcd/server/v3 ;;
        *) echo "k8s.io/kubernetes/cmd/$1" ;;
    esac
}

# Name `go build -o DIR/` gives the binary of each package.
go_output_name() {
    case $1 in
        etcd) echo server ;;
        *) echo "$1" ;;
    esac
}

pinned_version() {
    local v
    v=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v1\./ { print $2; exit }' "$here/go.mod")
    [[ -n $v ]] || die "no k8s.io/kubernetes requirement in $here/go.mod"
    echo "$v"
}

require_go() {
    command -v go >/dev/null 2>&1 || die "go not found in PATH (need go >= 1.26)"
}

# Regenerate go.mod for Kubernetes $1: every k8s.io/* module that kubernetes' own
# go.mod replaces with ./staging/... is replaced with its published v0.Y.Z.
pin() {
    local version=$1 minor gomod godirective staging tmp
    [[ $version =~ ^v1\.([0-9]+)\.[0-9]+$ ]] || die "version must look like v1.Y.Z, got $version"
    minor=${BASH_REMATCH[1]}
    require_go
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064  # expand $tmp now
    trap "rm -rf '$tmp'" EXIT
    gomod=$(cd "$tmp" && go mod download -json "k8s.io/kubernetes@$version" </dev/null |
        sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
    [[ -f $gomod ]] || die "could not download k8s.io/kubernetes@$version"
    godirective=$(awk '$1 == "go" { print $2; exit }' "$gomod")
    staging=$(awk '$2 == "=>" && $1 ~ /^k8s\.io\// && $3 ~ /^\.\/staging\// { print $1 }' "$gomod")
    [[ -n $staging ]] || die "no staging replacements found in $gomod"
    {
        echo "// Wrapper module: builds a real Kubernetes control plane (kube-apiserver,"
        echo "// kube-controller-manager, kube-scheduler, kubectl) and etcd from the Go module"
        echo "// proxy. See build.sh. Regenerate with: ./build.sh --pin vX.Y.Z"
        echo "module ioc-operator.test/controlplane"
        echo
        echo "go $godirective"
        echo
        echo "tool ("
        local b
        for b in "${binaries[@]}"; do
            printf '\t%s\n' "$(package_of "$b")"
        done
        echo ")"
        echo
        echo "require k8s.io/kubernetes $version"
        echo
        echo "replace ("
        local m
        for m in $staging; do
            printf '\t%s => %s v0.%s.%s\n' "$m" "$m" "$minor" "${version##*.}"
        done
        echo ")"
    } >"$here/go.mod"
    rm -f "$here/go.sum"
    # The tool directives keep `go mod tidy` from dropping the requirements.
    (cd "$here" && GOFLAGS=-mod=mod go mod tidy </dev/null)
    log "pinned $version ($(wc -w <<<"$staging") staging modules); etcd: $(
        awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ { print $2 }' "$here/go.mod")"
}

cache_root() {
    echo "${IOC_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ioc-operator}"
}

is_binary() {
    [[ -f $1 && -x $1 ]]
}

# Build the named binaries into $1 (atomically: temp dir, then rename per file).
build_into() {
    local bindir=$1 version=$2
    shift 2
    local minor tmp b pkgs=()
    minor=$(cut -d. -f2 <<<"$version")
    for b in "$@"; do
        pkgs+=("$(package_of "$b")")
    done
    require_go
    tmp=$(mktemp -d "$bindir/../tmp-build.XXXXXX")
    # shellcheck disable=SC2064  # expand $tmp now
    trap "rm -rf '$tmp'" EXIT
    log "building $* with $(go version) (cold: ~6-7 min on 2 cores, ~4 GB GOCACHE)"
    local ldflags="-s -w"
    ldflags+=" -X k8s.io/component-base/version.gitVersion=$version"
    ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
    ldflags+=" -X k8s.io/component-base/version.gitMinor=$minor"
    ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
    local started=$SECONDS build_pid
    # In the background so that SIGTERM/SIGINT interrupt `wait`, stop go build and clean up.
    (cd "$here" && exec go build -trimpath -buildvcs=false -ldflags "$ldflags" -o "$tmp/" \
        "${pkgs[@]}" </dev/null) &
    build_pid=$!
    # shellcheck disable=SC2064  # expand $build_pid now
    trap "kill $build_pid 2>/dev/null; exit 143" TERM INT HUP
    wait "$build_pid" || die "go build failed after $((SECONDS - started))s"
    trap - TERM INT HUP
    log "go build finished in $((SECONDS - started))s"
    for b in "$@"; do
        is_binary "$tmp/$(go_output_name "$b")" || die "go build produced no $b"
        mv -f "$tmp/$(go_output_name "$b")" "$bindir/$b"
    done
    rm -rf "$tmp"
    trap - EXIT
}

main() {
    case ${1:-} in
        --version)
            pinned_version
            return
            ;;
        --pin)
            [[ -n ${2:-} ]] || die "usage: $0 --pin vX.Y.Z"
            pin "$2"
            return
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
            return
            ;;
        "") ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac

    local version assets bindir b missing=()
    version=$(pinned_version)
    assets=${KUBEBUILDER_ASSETS:-}
    bindir="$(cache_root)/kubernetes-$version/bin"
    mkdir -p "$bindir"

    for b in "${binaries[@]}"; do
        if [[ -n $assets ]] && is_binary "$assets/$b"; then
            log "using $assets/$b (KUBEBUILDER_ASSETS)"
        elif ! is_binary "$bindir/$b"; then
            missing+=("$b")
        fi
    done

    if ((${#missing[@]})); then
        # Serialise concurrent runs: the second waits, then finds the binaries built.
        exec 9>"$bindir/../build.lock"
        log "waiting for build lock (max ${lock_timeout_s}s)"
        flock -w "$lock_timeout_s" 9 || die "timed out waiting for $bindir/../build.lock"
        # Leftovers of builds killed with SIGKILL (a running build is younger than a day).
        find "$bindir/.." -maxdepth 1 -name 'tmp-build.*' -mmin +1440 -exec rm -rf {} + || true
        local still=()
        for b in "${missing[@]}"; do
            is_binary "$bindir/$b" || still+=("$b")
        done
        if ((${#still[@]})); then
            build_into "$bindir" "$version" "${still[@]}"
        fi
        exec 9>&-
    fi

    local out=$bindir
    if [[ -n $assets ]]; then
        # Combine KUBEBUILDER_ASSETS with the cache in one directory of symlinks.
        out="$(cache_root)/kubernetes-$version/assets-$(printf '%s' "$assets" | cksum | cut -d' ' -f1)"
        mkdir -p "$out"
        for b in "${binaries[@]}"; do
            if is_binary "$assets/$b"; then
                ln -sfn "$(cd "$assets" && pwd)/$b" "$out/$b"
            else
                ln -sfn "$bindir/$b" "$out/$b"
            fi
        done
    fi

    local reported
    reported=$("$out/kube-apiserver" --version 2>/dev/null </dev/null || true)
    [[ $reported == "Kubernetes $version" ]] || log "WARNING: kube-apiserver reports '$reported', pinned $version"
    log "ready: $out"
    echo "$out"
}

main "$@"
