# PIE v2 API image: `docker build -t pie .` then
#   docker run -p 8000:8000 -e PIE_DATABASE_URL=postgresql://... -e PIE_COGNITO_REGION=... pie
# The same image runs `pie worker` (standalone dispatcher) and `pie migrate`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 pie \
    && useradd --system --uid 10001 --gid pie --create-home --home-dir /home/pie pie

WORKDIR /app
# dependencies first (cached while only the code changes): install the project's metadata
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && rm -rf build

# migrations are found beside the working directory (`pie serve` / `pie migrate` run them)
COPY alembic.ini ./
COPY migrations ./migrations

USER pie
# the embedded database (only used when PIE_DATABASE_URL is unset) and the dev secret live here
ENV PIE_DATA_DIR=/home/pie/.pie \
    PIE_HOST=0.0.0.0 \
    PIE_PORT=8000
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4).status == 200 else 1)"]

CMD ["pie", "serve", "--host", "0.0.0.0", "--port", "8000"]
