# openai-forward in a container.
#
#   docker build -t openai-forward .
#   docker run -d --name aifd --env-file .env -p 8000:8000 --stop-timeout 35 \
#       -v aifd-log:/app/Log -v aifd-cache:/app/cache openai-forward
#
# Configuration comes from the environment (--env-file .env): .env.example is written so that
# every line of it survives `docker --env-file`. See deploy.md.

# --- Stage 1: a virtual environment with the proxy and its dependencies ----------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv
ENV PATH="$VIRTUAL_ENV/bin:$PATH"
WORKDIR /src

# Dependencies first, read from pyproject.toml alone (with the lmdb and redis extras): this
# layer is built again only when pyproject.toml changes, not on every change to the source.
COPY pyproject.toml ./
RUN python -m venv "$VIRTUAL_ENV" \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; x = p['optional-dependencies']; print(*p['dependencies'], *x['lmdb'], *x['redis'], sep='\n')" > requirements.txt \
 && pip install -r requirements.txt

# Then the proxy itself, without touching what is installed above.
COPY README.md LICENSE ./
COPY openai_forward ./openai_forward
RUN pip install --no-deps . \
 && pip check

# --- Stage 2: the runtime image ------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv
ENV PATH="$VIRTUAL_ENV/bin:$PATH"

# A user of its own, owning only what it writes: chat logs and an on-disk cache.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /app \
        --shell /usr/sbin/nologin aifd \
 && mkdir -p /app/Log /app/cache \
 && chown aifd:aifd /app/Log /app/cache
COPY --from=build /opt/venv /opt/venv

# ./.env and ./Log resolve here. LOG_FOLDER=Log (the default) is /app/Log; an LMDB, LevelDB or
# RocksDB cache with CACHE_ROOT_PATH_OR_URL=. (the default) lives in /app/cache/<backend>.
WORKDIR /app
# Numeric, so that platforms can tell it is not root (Kubernetes runAsNonRoot).
USER 10001:10001
VOLUME ["/app/Log", "/app/cache"]
EXPOSE 8000

# No curl in the image: the health check is Python's own urllib (fails on any non-2xx answer).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# On SIGTERM (docker stop) requests and streams in flight get SHUTDOWN_TIMEOUT seconds (default
# 30) to finish: give `docker stop` more than that (--stop-timeout 35, compose stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["aifd", "run", "--host", "0.0.0.0", "--port", "8000"]
