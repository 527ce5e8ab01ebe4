# PIE v2 API image: `docker build -t pie .` then
#   docker run -p 8000:8000 -e PIE_DATABASE_URL=postgresql://... -e PIE_COGNITO_REGION=... pie
# The same image runs `pie worker` (standalone dispatcher) and `pie migrate`. It has no
# embedded PostgreSQL (the `embedded` extra is left out): set PIE_DATABASE_URL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 pie \
    && useradd --system --uid 10001 --gid pie --create-home --home-dir /home/pie pie

WORKDIR /app
# 1. dependencies only, pinned by the lock file: this layer is rebuilt when requirements.txt
#    changes, never for a code change
COPY requirements.txt ./
RUN pip install -r requirements.txt

# 2. the package itself (the wheel carries the Alembic migrations as pie/_migrations)
COPY pyproject.toml setup.py MANIFEST.in README.md alembic.ini ./
COPY migrations ./migrations
COPY src ./src
RUN pip install --no-deps . && rm -rf build src/*.egg-info

USER pie
# the development secret (unused with Cognito) lives here; mount a volume to keep it
ENV PIE_DATA_DIR=/home/pie/.pie \
    PIE_HOST=0.0.0.0 \
    PIE_PORT=8000
RUN mkdir -p /home/pie/.pie
VOLUME ["/home/pie/.pie"]
EXPOSE 8000

# ready = the database answers and its schema is at the code's head revision
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4).status == 200 else 1)"]

# `pie serve` migrates the database (once, under an advisory lock) and serves; scale one
# container's processes with PIE_WORKERS or --workers
CMD ["pie", "serve", "--host", "0.0.0.0", "--port", "8000"]
