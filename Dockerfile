# The operator image: `celery-worker-operator run` as a non-root user on a slim Python.
# Two stages, so nothing used to build (pip's wheel cache, the source tree) reaches the image;
# every dependency installs from a wheel, so no compiler is needed in either stage.
# tests/deploy/test_dockerfile.py runs the build stage's install steps in a fresh venv in CI.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-compile .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 operator \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin operator
COPY --from=build /opt/venv /opt/venv
# Two malloc arenas: passes run on up to 32 threads, and glibc's default (8 per core) grows memory with them.
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 MALLOC_ARENA_MAX=2
# Numeric, so the kubelet can enforce runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# metrics (/metrics) and kopf's liveness endpoint (/healthz)
EXPOSE 9090 8080
ENTRYPOINT ["celery-worker-operator", "run"]
CMD ["--all-namespaces"]
