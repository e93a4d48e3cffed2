# syntax=docker/dockerfile:1
# The gateway image: the sidecars of `sidecar` mode IOCs and the name service. The
# operator renders pvagw as `/bin/sh -c 'sed "s/@POD_IP@/$POD_IP/g" ... > /run/pvagw/...
# && exec pvagw ...'`, so it needs /bin/sh, sed and pvagw (from p4p); it carries the
# ioc-operator package for ioc-ca-gateway, ioc-ca-pva-bridge and ioc-name-server.
# Build from the repository root (kind/create.sh does):
#   docker build -f docker/gateway.Dockerfile -t ghcr.io/epics-operator/ioc-gateway:0.1.0 .
# Every Python package is pinned in docker/requirements.txt.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Compilers only for platforms without binary wheels (p4p has none for arm64).
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY docker/requirements.txt docker/requirements.txt
RUN pip wheel --no-deps --wheel-dir /wheels -r docker/requirements.txt
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="ioc-gateway" \
      org.opencontainers.image.description="ioc-operator's sidecar gateways (pvagw, CA gateway, CA-to-PVA bridge) and name server" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="BSD-3-Clause"
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 HOME=/tmp
COPY docker/requirements.txt /tmp/requirements.txt
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels --no-deps -r /tmp/requirements.txt ioc-operator \
    && pip check \
    && rm /tmp/requirements.txt \
    && command -v sh && command -v sed && command -v pvagw \
    && pvagw --help >/dev/null \
    && ioc-ca-gateway --help >/dev/null && ioc-ca-pva-bridge --help >/dev/null \
    && ioc-name-server --help >/dev/null
# A passwd entry for the non-root uid: kopf's peering id and caproto's CA client name
# come from getpass.getuser(), which fails for a uid that has none.
RUN groupadd --system --gid 65532 ioc \
    && useradd --system --uid 65532 --gid 65532 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin ioc
USER 65532:65532
CMD ["pvagw", "--help"]
