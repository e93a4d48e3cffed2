# One-command entry points. Each target does its own set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup system-deps controlplane demo test unit lint bench bench-node bench-lab soak crd clean

$(VENV)/.installed: pyproject.toml testbed/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' -e ./testbed
	touch $@

## setup: virtual environment with the operator and its test dependencies
setup: $(VENV)/.installed

# Debian packages of the network lab and the real nodes: containerd, runc and the CNI
# plugins run pods; buildah and debootstrap build the images; script(1) gives kubectl
# attach a terminal in the tests.
SYSTEM_PACKAGES := iproute2 iptables conntrack containerd runc containernetworking-plugins \
	buildah debootstrap util-linux bsdutils gcc libc6-dev

## system-deps: the Debian packages of the network lab and the real nodes (root only)
system-deps:
	@if [ "$$(id -u)" = 0 ] && [ "$$(dpkg-query -W -f='$${db:Status-Status}\n' \
			$(SYSTEM_PACKAGES) 2>/dev/null | grep -cx installed)" != $(words $(SYSTEM_PACKAGES)) ]; \
	then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			$(SYSTEM_PACKAGES); \
	fi

## controlplane: build (or reuse) etcd, kube-apiserver, ... and helm from the Go module proxy
controlplane:
	bash testbed/ioc_testbed/kubernetes/build.sh >/dev/null
	bash testbed/ioc_testbed/kubernetes/build-helm.sh >/dev/null

## demo: the examples on a throwaway control plane and broadcast-less lab (root for the lab)
demo: setup system-deps
	$(VENV)/bin/ioc-testbed demo

## test: lint, then every test (unit, real control plane, network lab)
test: setup system-deps controlplane
	$(PY) -m ruff check operator testbed tests benchmarks
	$(PY) -m pytest

## unit: the fast tests only (no Go, no root)
unit: setup
	$(PY) -m pytest tests/unit

lint: setup
	$(PY) -m ruff check operator testbed tests benchmarks
	$(PY) -m mypy

## bench: operator benchmarks on a real control plane; writes docs/benchmarks.md
bench: setup controlplane
	$(PY) -m benchmarks.bench_operator

## bench-node: time to Running, Ready and first read on real nodes (root); writes docs/real-node.md
bench-node: setup system-deps controlplane
	$(PY) -m benchmarks.bench_real_node

## bench-lab: gateway, bridge and discovery benchmarks in the network lab (root)
bench-lab: setup system-deps
	$(PY) -m benchmarks.bench_ca_gateway
	$(PY) -m benchmarks.bench_bridge
	$(PY) -m benchmarks.bench_discovery

## soak: an hour of mixed load on the CA gateway, bridge and name server (root); writes docs/soak.md
soak: setup system-deps
	$(PY) -m benchmarks.soak

## crd: regenerate crds/ from the model
crd: setup
	$(VENV)/bin/ioc-operator crd > crds/iocs.epics-operator.io.yaml
	cp crds/iocs.epics-operator.io.yaml charts/ioc-operator/crds/

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
