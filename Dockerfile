# PIE v2 image: `docker build -t pie-server .` then
#   docker run -p 8000:8000 --env-file .env pie-server             (pie serve, settings from the environment)
#   docker run -p 9000:9000 -e PIE_PORT=9000 --env-file .env pie-server
#   docker run --env-file .env pie-server pie worker                (a standalone job dispatcher)
#   docker run --env-file .env pie-server pie migrate
# It has no embedded PostgreSQL (the `embedded` extra is left out): set PIE_DATABASE_URL. Without
# Cognito or PIE_JWT_SECRET, `pie serve` refuses to start on 0.0.0.0 unless PIE_AUTH_MODE=development.
#
# The base image is pinned by digest (a rebuild gets the same Python and Debian packages); to move
# to a newer python:3.11-slim, take the digest of
#   docker buildx imagetools inspect python:3.11-slim --format '{{json .Manifest.Digest}}'
FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

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
# settings come from the environment (-e, --env-file, compose's env_file): these are the
# container's defaults. The development secret (unused with Cognito) lives in PIE_DATA_DIR;
# mount a volume there to keep it.
ENV PIE_DATA_DIR=/home/pie/.pie \
    PIE_HOST=0.0.0.0 \
    PIE_PORT=8000
RUN mkdir -p /home/pie/.pie
VOLUME ["/home/pie/.pie"]
EXPOSE 8000

# ready = the database answers and its schema is at the code's head revision; probes the port
# `pie serve` listens on (--port, else PIE_PORT), and passes for `pie worker` / `pie migrate`
# (they serve no HTTP)
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "pie.healthcheck"]

# SIGTERM: in-flight requests and in-process jobs get PIE_SHUTDOWN_GRACE_SECONDS (default 10 s);
# give the container longer than that before it is killed (docker stop -t, compose's
# stop_grace_period)
STOPSIGNAL SIGTERM

# `pie serve` migrates the database (once, under an advisory lock) and serves on PIE_HOST:PIE_PORT;
# scale one container's processes with PIE_WORKERS
CMD ["pie", "serve"]
