# syntax=docker/dockerfile:1
# Serving image: the spam_mlops package running the Ray Serve API (`spam-mlops serve --port 8000`).
# Port 8000: the HTTP API (/api/predict, /healthz, /readyz, /docs); port 8080: Ray's Prometheus metrics.
# Build from the repository root:  docker build -f docker/Dockerfile.serve -t spam-mlops-serve:dev .
# (The top-level Dockerfile is a byte-identical copy of this file, checked by tests/test_manifests.py.)

# ---- build stage: a virtualenv with the locked dependencies ------------------------------------------
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY spam_mlops/ spam_mlops/
RUN pip install --no-cache-dir -c constraints.txt .

# ---- runtime stage -----------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS runtime
# tini reaps the processes Ray starts (raylet, workers, proxy) and forwards SIGTERM for a graceful drain
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/app
USER 10001:10001
EXPOSE 8000 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["spam-mlops", "serve", "--port", "8000"]
