# syntax=docker/dockerfile:1
#
# The event pipeline's image: `python -m bytewax.run dataflows.main`, as a non-root user.
#
#   docker build -t event-pipeline:0.1.0 .
#   docker run --rm -p 9464:9464 \
#     -v /srv/geoip:/data/geoip:ro -v pipeline-recovery:/var/lib/pipeline/recovery \
#     -e PIPELINE_INPUT=kafka -e KAFKA_BOOTSTRAP_SERVERS=... event-pipeline:0.1.0
#
# Volumes:
#   /data/geoip                  the GeoIP2/GeoLite2 City database, GEOIP_CITY_DB=/data/geoip/GeoLite2-City.mmdb
#                                (not in the image: MaxMind's licence; the bundled test database
#                                stays available inside the package for demos)
#   /var/lib/pipeline/recovery   the Bytewax recovery store (docs/runbook.md)
# Ports: 9464 the pipeline's Prometheus metrics, 9999 Bytewax process-to-process traffic
# (multi-process clusters only).

# Pin by digest as well when the registry is mirrored: python:3.11.13-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- native: the compiled hot paths (native/, Rust) as an abi3 wheel for CPython >= 3.11 -----
# Debian bookworm's python3 is 3.11, what the wheel is built against.
FROM rust:1.95-bookworm AS native

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/maturin \
 && /opt/maturin/bin/pip install --no-cache-dir 'maturin>=1.7,<2'

WORKDIR /src/native
COPY native ./
RUN /opt/maturin/bin/maturin build --release --interpreter python3 --out /wheels

# --- builder: a virtualenv with the package and its runtime dependencies (no test extra) ----
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1

RUN pip install uv==0.13.9 \
 && python -m venv /opt/venv

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN uv pip compile --quiet --python /opt/venv/bin/python pyproject.toml -o /tmp/requirements.txt \
 && uv pip install --python /opt/venv/bin/python -r /tmp/requirements.txt

# Then the package itself (the source directories only; tests, docs and k8s are not copied).
COPY dataflows ./dataflows
COPY operators ./operators
COPY connectors ./connectors
COPY recovery ./recovery
COPY --from=native /wheels /wheels
RUN uv pip install --python /opt/venv/bin/python --no-deps . /wheels/*.whl \
 && /opt/venv/bin/python -c "import dataflows.config, dataflows.metrics, bytewax.run, pipeline_native"

# --- runtime -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG UID=10001
# jemalloc in place of glibc's malloc (LD_PRELOAD below): glibc's took about a tenth of the job's
# CPU in a catch-up, and the job runs about 12% faster without it (docs/benchmarks.md).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjemalloc2 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid "${UID}" pipeline \
 && useradd --system --uid "${UID}" --gid pipeline --home-dir /var/lib/pipeline \
      --no-create-home --shell /usr/sbin/nologin pipeline \
 && mkdir -p /data/geoip /var/lib/pipeline/recovery \
 && chown -R pipeline:pipeline /data/geoip /var/lib/pipeline

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LD_PRELOAD=libjemalloc.so.2 \
    GEOIP_CITY_DB=/data/geoip/GeoLite2-City.mmdb \
    METRICS_HOST=0.0.0.0 \
    METRICS_PORT=9464

WORKDIR /var/lib/pipeline
USER pipeline:pipeline

VOLUME ["/data/geoip", "/var/lib/pipeline/recovery"]
EXPOSE 9464 9999

# No curl in the slim image: ask the metrics endpoint with Python's standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('METRICS_PORT', '9464'), timeout=4).read(1)" || exit 1

# Bytewax stops all its workers cleanly on an interrupt.
STOPSIGNAL SIGINT

ENTRYPOINT ["python", "-m", "bytewax.run"]
# The dataflow to run. Recovery goes here once enabled for plain `docker run`:
#   CMD ["dataflows.main", "-r", "/var/lib/pipeline/recovery", "-s", "30", "-b", "0"]
# or, equivalently, set BYTEWAX_RECOVERY_DIRECTORY, BYTEWAX_SNAPSHOT_INTERVAL and
# BYTEWAX_RECOVERY_BACKUP_INTERVAL (what k8s/statefulset.yaml does). The store must be
# initialised first: python -m bytewax.recovery /var/lib/pipeline/recovery <partitions>.
CMD ["dataflows.main"]
