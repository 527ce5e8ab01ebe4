"""Start-up checks shared by the ``pie`` commands.

Every configuration mistake becomes a :class:`ConfigError`: one line naming the ``PIE_*``
variable (or the flag) and what is wrong; the command line prints it and exits with 2 before
anything (the embedded PostgreSQL, migrations, the HTTP server) is started. An unreachable
database is retried for ``PIE_DB_STARTUP_TIMEOUT`` seconds, one log line per attempt.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import time
from pathlib import Path

from pydantic import AliasChoices, ValidationError

from pie.config import Settings, get_settings

log = logging.getLogger("pie.startup")

POSTGRES_DRIVERS = {
    "postgres",
    "postgresql",
    "postgresql+psycopg",
    "postgresql+psycopg2",
    "postgresql+asyncpg",
}


class ConfigError(Exception):
    """A configuration mistake; ``str()`` is the one line shown to the operator (exit code 2)."""


class DatabaseUnavailable(Exception):
    """The database could not be reached within PIE_DB_STARTUP_TIMEOUT (exit code 1)."""


def env_name(field_name: str) -> str:
    """The environment variable that sets a settings field (its first alias, else PIE_<FIELD>)."""
    info = Settings.model_fields.get(field_name)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"PIE_{field_name.upper()}"


def describe_validation_error(exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = first.get("loc") or ("?",)
    name = env_name(str(loc[0]))
    line = f"{name}={first.get('input')!r} is invalid: {first.get('msg')}"
    if len(errors) > 1:
        others = sorted({env_name(str((e.get("loc") or ("?",))[0])) for e in errors[1:]} - {name})
        if others:
            line += f" (also invalid: {', '.join(others)})"
    return line


def load_settings() -> Settings:
    """The process settings, or a ConfigError naming the variable that is wrong."""
    try:
        return get_settings()
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def check_database_url(settings: Settings) -> None:
    url = settings.database_url
    if not url:
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            "PIE_DATABASE_URL is not a database URL (expected postgresql://user:password@host:5432/dbname)"
        ) from None
    if parsed.drivername not in POSTGRES_DRIVERS:
        raise ConfigError(
            f"PIE_DATABASE_URL uses {parsed.drivername!r}: PIE needs PostgreSQL "
            "(postgresql://user:password@host:5432/dbname)"
        )


def uses_data_dir(settings: Settings) -> bool:
    """The embedded database or the generated development secret live under PIE_DATA_DIR."""
    return not settings.database_url or (not settings.jwt_secret and not settings.cognito_jwks_url)


def check_data_dir(settings: Settings) -> Path:
    """PIE_DATA_DIR is (or can be made) a writable directory; returns its absolute path."""
    path = Path(settings.data_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"PIE_DATA_DIR={str(settings.data_dir)!r} is not a directory ({path} is a file)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(
            f"PIE_DATA_DIR={str(settings.data_dir)!r} is not a writable directory: {exc.strerror or exc}"
        ) from None
    return path


def cognito_configured(settings: Settings) -> bool:
    return bool(settings.cognito_jwks_url)


def check_auth(settings: Settings) -> None:
    region, pool = settings.cognito_region, settings.cognito_user_pool_id
    if region and not pool:
        raise ConfigError(
            "PIE_COGNITO_REGION is set without PIE_COGNITO_USER_POOL_ID: set both (production) or neither (development)"
        )
    if pool and not region:
        raise ConfigError(
            "PIE_COGNITO_USER_POOL_ID is set without PIE_COGNITO_REGION: set both (production) or neither (development)"
        )
    if settings.jwks_url and not settings.cognito_issuer:
        raise ConfigError(
            "PIE_JWKS_URL is set without an issuer: set PIE_JWT_RS256_ISSUER "
            "(or PIE_COGNITO_REGION and PIE_COGNITO_USER_POOL_ID)"
        )
    if settings.jwt_secret and cognito_configured(settings) and not settings.allow_dev_tokens_with_cognito:
        raise ConfigError(
            "PIE_JWT_SECRET is set while Cognito is configured: unset it (anyone knowing it could mint "
            "admin tokens), or set PIE_ALLOW_DEV_TOKENS_WITH_COGNITO=true to accept development tokens too"
        )


def auth_mode(settings: Settings) -> str:
    """One line saying which tokens the server accepts."""
    if cognito_configured(settings):
        mode = f"cognito (issuer {settings.cognito_issuer}"
        if settings.cognito_app_client_ids:
            mode += f", app clients {', '.join(settings.cognito_app_client_ids)}"
        mode += ")"
        if settings.jwt_secret:
            mode += " + development HS256 tokens (PIE_ALLOW_DEV_TOKENS_WITH_COGNITO=true)"
        return mode
    if settings.jwt_secret:
        return "development (HS256 tokens signed with PIE_JWT_SECRET)"
    from pie.auth import DEV_SECRET_FILE

    secret = Path(settings.data_dir).expanduser().absolute() / DEV_SECRET_FILE
    return f"development (HS256 tokens signed with the secret in {secret})"


def check_settings(settings: Settings) -> None:
    """Every check that needs no network: database URL, auth, data directory."""
    check_database_url(settings)
    check_auth(settings)
    if uses_data_dir(settings):
        check_data_dir(settings)


def check_port(host: str, port: int, flag: str = "--port/PIE_PORT") -> None:
    """The address can be bound (checked before the database starts)."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"{flag}={port} is invalid: a port is 1..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host/PIE_HOST={host!r} is invalid: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # as uvicorn binds: SO_REUSEADDR, so a socket in TIME_WAIT does not count as "in use"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"{flag}={port}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def display_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def wait_for_database(url: str, timeout: float, *, interval: float = 2.0) -> None:
    """Connect once, retrying for ``timeout`` seconds with one warning line per failed attempt."""
    import psycopg

    from pie.db import libpq_url

    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        try:
            with psycopg.connect(libpq_url(url), connect_timeout=max(2, min(10, int(remaining) or 2))):
                return
        except psycopg.Error as exc:
            reason = " ".join(str(exc).split()) or exc.__class__.__name__
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DatabaseUnavailable(
                    f"cannot use the database {display_url(url)} after {attempt} attempt(s) in "
                    f"{timeout:g}s (PIE_DB_STARTUP_TIMEOUT): {reason}"
                ) from None
            log.warning(
                "database %s not reachable (attempt %d, retrying for %.0fs more): %s",
                display_url(url),
                attempt,
                remaining,
                reason,
            )
            time.sleep(min(interval, remaining))
