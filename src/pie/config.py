"""Settings, read from ``PIE_*`` environment variables and a ``.env`` file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# connection pool defaults (see db_pool_size below)
POOL_SIZE = 12
MAX_OVERFLOW = 0
READ_POOL_SIZE = 8


class Settings(BaseSettings):
    # env_ignore_empty: `PIE_X=` (as in .env.example) means "use the default"
    model_config = SettingsConfigDict(env_prefix="PIE_", env_file=".env", extra="ignore", env_ignore_empty=True)

    # database
    database_url: str | None = None
    data_dir: Path = Path(".pie")
    # Per process; connections are opened lazily, so an idle process holds few. Sized so that
    # `pie serve --workers 2` plus one `pie worker` fit a stock max_connections=100 with room for
    # migrations and psql (docs/deployment.md "Connection budget"); a larger pool does not make
    # one process faster (it is CPU-bound long before). No overflow by default: overflow
    # connections are opened and closed per burst (churn, and a new connection to a full server
    # fails where a kept one would not).
    db_pool_size: int = Field(default=POOL_SIZE, ge=1)
    db_max_overflow: int = Field(default=MAX_OVERFLOW, ge=0)
    # autocommit connections of the single-statement hot reads (pie.reads), besides the pool above
    db_read_pool_size: int = Field(default=READ_POOL_SIZE, ge=1)
    # at start, refuse (exit 2) when this process set's maximum connections exceed what the
    # server has left; false (e.g. behind PgBouncer): the arithmetic is logged as a warning
    db_check_connections: bool = True
    # connections older than this are replaced at checkout (0 = never); no pre-ping per checkout
    db_pool_recycle_seconds: float = Field(default=1800.0, ge=0)
    # timeouts to the database (requests that hit one get the 503 envelope at once); 0 = none
    db_connect_timeout: float = Field(default=5.0, ge=0)
    db_statement_timeout_ms: int = Field(default=30_000, ge=0)
    db_lock_timeout_ms: int = Field(default=5_000, ge=0)
    # seconds `pie serve` / `pie worker` / `pie migrate` keep retrying an unreachable database at
    # start (one log line per attempt) before giving up with a clear error
    db_startup_timeout: float = Field(default=30.0, ge=0)

    # auth: `development` is the explicit opt-in to development tokens with a generated secret
    # (neither Cognito nor PIE_JWT_SECRET) on a non-loopback address
    auth_mode: Literal["auto", "development"] = "auto"
    # auth: development HS256
    jwt_secret: str | None = None
    jwt_issuer: str = "pie-dev"
    # PIE_JWT_SECRET is refused while Cognito is configured (a leftover secret would let anyone
    # who knows it forge admin tokens) unless the operator opts in here
    allow_dev_tokens_with_cognito: bool = False
    # auth: production Cognito RS256
    cognito_region: str | None = None
    cognito_user_pool_id: str | None = None
    cognito_app_client_ids: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # override of the JWKS URL / issuer (tests, private endpoints); derived from Cognito when unset
    jwks_url: str | None = None
    jwt_rs256_issuer: str | None = None
    jwks_refetch_cooldown_seconds: float = 30.0
    # how long a machine token's tenant (its app client -> client mapping) is cached per process
    tenant_cache_seconds: float = Field(default=10.0, ge=0)
    # verified bearer tokens cached per process (keyed on the raw token), each until its exp and
    # at most PIE_TOKEN_CACHE_SECONDS; 0 entries disables the cache
    token_cache_size: int = Field(default=4096, ge=0)
    token_cache_seconds: float = Field(default=300.0, ge=0)
    # the hot GETs' success case served by one pure ASGI layer (pie.http.fast); off: FastAPI only
    fast_reads: bool = True
    # the success case of POST direct inference served by one pure ASGI layer (pie.http.fast, pie.registry.hot)
    fast_writes: bool = True

    # operator console: Cognito hosted UI sign-in (authorization code + PKCE) when both are set
    console_cognito_domain: str | None = None  # e.g. https://pie.auth.eu-west-1.amazoncognito.com
    console_cognito_client_id: str | None = None
    console_cognito_client_secret: str | None = None  # only for a confidential app client
    console_cognito_scopes: str = "openid"

    # clock skew tolerated on exp / nbf / iat (seconds)
    jwt_leeway_seconds: int = Field(default=60, ge=0, le=600)

    # HTTP (`pie serve` defaults; --host/--port/--log-level override)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # API processes `pie serve` runs on the one port (uvicorn workers; --workers overrides)
    workers: int = Field(default=1, ge=1, le=64)
    # add an X-PIE-Worker-PID header (the answering process) to every response: debugging and
    # tests of --workers; leave off in production
    expose_worker_pid: bool = False
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # operations (README "Operating PIE")
    log_format: Literal["text", "json"] = "text"
    access_log: bool = True
    metrics_enabled: bool = True
    # SIGTERM: how long in-flight requests and in-process jobs may take before jobs are released
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    # OpenTelemetry request spans (extra `pie-server[otel]`; standard OTEL_* variables)
    otel_enabled: bool = False
    public_url: str = "http://127.0.0.1:8000"
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # larger request bodies are refused with 413 before they are read into memory
    max_request_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    # JSON bodies: deeper nesting or larger arrays/objects are a 400 naming the limit
    json_max_depth: int = Field(default=64, ge=2, le=200)
    json_max_items: int = Field(default=100_000, gt=0)
    # HTTP server limits (uvicorn + pie.httpserver's httptools protocol; see the README table)
    http_max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    http_max_headers: int = Field(default=100, gt=0)
    http_header_timeout_seconds: float = Field(default=10.0, gt=0)
    http_body_timeout_seconds: float = Field(default=60.0, gt=0)
    http_keep_alive_seconds: float = Field(default=5.0, gt=0)
    http_limit_concurrency: int = Field(default=4096, gt=0)
    http_backlog: int = Field(default=2048, gt=0)
    # idempotency keys (Idempotency-Key header): how long a key's first response is replayed
    idempotency_key_ttl_seconds: int = Field(default=24 * 3600, ge=3600)

    # jobs and dispatch
    run_dispatcher: bool = True
    dispatch_poll_interval: float = 1.0
    dispatch_batch_size: int = 50
    dispatch_max_attempts: int = 5
    dispatch_backoff_base: float = 0.5
    dispatch_backoff_max: float = 60.0
    job_timeout_seconds: float = 3600.0
    in_process_lease_seconds: float = 300.0
    in_process_workers: int = 4
    # Lambda Invoke / ECS RunTask calls one dispatcher makes at once (threads and HTTP connections)
    dispatch_aws_concurrency: int = Field(default=32, ge=1, le=256)
    # how often a dispatcher looks for timed-out jobs and expired in-process leases
    dispatch_sweep_interval: float = 5.0
    # a job's callback token expires this long after the job's time-out
    callback_token_margin_seconds: float = Field(default=900.0, ge=0)
    # the largest Lambda Event (asynchronous) invocation payload: 256 KB is the limit every
    # region had until AWS raised it to 1 MB in 2025; set 1048576 where your functions allow it
    lambda_max_payload_bytes: int = Field(default=256 * 1024, gt=0)
    # dispatchers heartbeat in the database this often; one silent for dispatch_dead_after
    # seconds is dead and its in-process jobs go back to the queue (seconds, not the lease)
    dispatch_heartbeat_interval: float = Field(default=2.0, gt=0)
    dispatch_dead_after: float = Field(default=10.0, gt=0)

    # webhooks (docs/webhooks.md): delivery runs beside each dispatcher (`pie serve`, `pie worker`)
    webhooks_deliver: bool = True
    # development only: http:// URLs; loopback/private/link-local targets
    webhooks_allow_http: bool = False
    webhooks_allow_private: bool = False
    # deliveries in flight per process, and per webhook per process (a slow receiver cannot
    # take every slot)
    webhooks_concurrency: int = Field(default=64, ge=1, le=1024)
    webhooks_endpoint_concurrency: int = Field(default=8, ge=1, le=256)
    webhooks_connect_timeout: float = Field(default=5.0, gt=0, le=60)
    webhooks_timeout: float = Field(default=15.0, gt=0, le=120)
    # retries: exponential backoff with jitter; the first retry comes within the base (<= 10 s),
    # each wait at most the max; a delivery is retried until it is this many hours old
    webhooks_backoff_base: float = Field(default=5.0, gt=0, le=10)
    webhooks_backoff_max: float = Field(default=3600.0, gt=0)
    webhooks_retry_hours: float = Field(default=24.0, gt=0)
    # the polling fallback of the delivery loop (it wakes at once on LISTEN pie_webhooks)
    webhooks_poll_interval: float = Field(default=1.0, gt=0)
    # events and their delivery log are deleted this many days after the event (when no
    # delivery of it is still pending)
    webhooks_retention_days: float = Field(default=30.0, gt=0)

    # AWS
    aws_region: str = Field(default="us-east-1", validation_alias=AliasChoices("AWS_REGION", "PIE_AWS_REGION"))
    aws_endpoint_url: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_ENDPOINT_URL", "PIE_AWS_ENDPOINT_URL")
    )
    ecs_launch_type: str = "FARGATE"
    ecs_subnets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    ecs_security_groups: Annotated[list[str], NoDecode] = Field(default_factory=list)
    ecs_assign_public_ip: bool = False
    ecs_container_name: str = "main"
    ecs_payload_env_var: str = "PIE_JOB_PAYLOAD"

    @field_validator("log_level", "log_format", "auth_mode", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("cognito_app_client_ids", "cors_origins", "ecs_subnets", "ecs_security_groups", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @property
    def cognito_issuer(self) -> str | None:
        if self.jwt_rs256_issuer:
            return self.jwt_rs256_issuer
        if self.cognito_region and self.cognito_user_pool_id:
            return f"https://cognito-idp.{self.cognito_region}.amazonaws.com/{self.cognito_user_pool_id}"
        return None

    @property
    def cognito_jwks_url(self) -> str | None:
        if self.jwks_url:
            return self.jwks_url
        issuer = self.cognito_issuer
        return f"{issuer}/.well-known/jwks.json" if issuer else None


@lru_cache
def get_settings() -> Settings:
    return Settings()
