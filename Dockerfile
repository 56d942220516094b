FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY openai_forward ./openai_forward
RUN pip install '.[lmdb,redis]' && useradd --create-home --uid 10001 aifd && mkdir -p /data && chown aifd /data
USER aifd
WORKDIR /data
EXPOSE 8000
# Configuration comes from the environment: docker run --env-file .env -p 8000:8000 openai-forward
CMD ["aifd", "run", "--host", "0.0.0.0", "--port", "8000"]
