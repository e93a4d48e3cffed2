# syntax=docker/dockerfile:1
# The example IOC image that examples/*.yaml run: the EPICS server kinds the operator
# supports, each serving <prefix>value, counter, mode and wave (the same files the test
# bed's network lab runs):
#   python -m pvxslibs.ioc -m P=<prefix> -d /epics/example/example.db      rsrv + QSRV2
#   python -m epicscorelibs.ioc -m P=<prefix> -d /epics/example/example.db rsrv + QSRV1
#   python /epics/example/caproto_ioc.py <prefix>                           caproto (CA)
#   python /epics/example/pcaspy_ioc.py <prefix>                            pcas (CA)
#   python /epics/example/p4p_ioc.py <prefix>                               p4p (PVA)
# and a client for tests and trials, reading only the EPICS_* environment:
#   python /epics/example/client.py --lib pyepics|caproto|p4p --op get|put|monitor --pv PV
# The soft IOCs read their shell from stdin: the operator keeps it open (spec.console).
# Build from the repository root (kind/create.sh does):
#   docker build -f docker/example-ioc.Dockerfile -t ghcr.io/epics-operator/example-ioc:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="example-ioc" \
      org.opencontainers.image.description="Example EPICS IOCs for ioc-operator: soft IOCs (rsrv, QSRV1, QSRV2), caproto, pcaspy, p4p" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="BSD-3-Clause"
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 HOME=/tmp
COPY docker/example-ioc-requirements.txt /tmp/requirements.txt
RUN pip install --only-binary=:all: --no-deps -r /tmp/requirements.txt \
    && pip check \
    && rm /tmp/requirements.txt \
    && python -c "import pvxslibs, epicscorelibs, p4p, caproto, pcaspy, epics"
COPY testbed/ioc_testbed/iocs/ /epics/example/
COPY testbed/ioc_testbed/lab/client.py /epics/example/client.py
# A passwd entry for the non-root uid: EPICS clients and servers name their user with
# getpass.getuser(), which fails for a uid that has none.
RUN groupadd --system --gid 65532 ioc \
    && useradd --system --uid 65532 --gid 65532 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin ioc
USER 65532:65532
WORKDIR /epics/example
CMD ["python", "-m", "pvxslibs.ioc", "-m", "P=EXAMPLE:", "-d", "/epics/example/example.db"]
