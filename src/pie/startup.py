"""Start-up checks shared by the ``pie`` commands.

Every configuration mistake becomes a :class:`ConfigError`: one line naming the ``PIE_*``
variable (or the flag) and what is wrong; the command line prints it and exits with 2 before
anything (the embedded PostgreSQL, migrations, the HTTP server) is started. An unreachable
database is retried for ``PIE_DB_STARTUP_TIMEOUT`` seconds, one log line per attempt.
"""

from __future__ import annotations

import difflib
import errno
import ipaddress
import logging
import os
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
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


# PIE_* variables read outside the settings: the handler kit's payload variable (ECS tasks)
_OTHER_VARIABLES = {"PIE_JOB_PAYLOAD"}


def known_variables() -> set[str]:
    """Every PIE_* environment variable PIE reads."""
    names = set(_OTHER_VARIABLES)
    for field_name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {str(choice).upper() for choice in alias.choices if str(choice).upper().startswith("PIE_")}
        else:
            names.add(f"PIE_{field_name.upper()}")
    return names


def unknown_variables(sources: Mapping[str, Mapping[str, str | None]]) -> list[str]:
    """One line per PIE_* variable of ``sources`` (where -> variables) that PIE does not read,
    naming the closest known one when there is one (a misspelling is otherwise silent)."""
    known = known_variables()
    lines = []
    for where, variables in sources.items():
        for name in sorted(variables):
            upper = name.upper()
            if not upper.startswith("PIE_") or upper in known:
                continue
            close = difflib.get_close_matches(upper, known, n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]}?" if close else ""
            lines.append(f"{name} ({where}) is not a PIE setting and is ignored{hint}")
    return lines


def warn_unknown_variables(environ: Mapping[str, str] | None = None, env_file: Path | str = ".env") -> list[str]:
    """Log a WARNING for every unknown PIE_* variable of the environment and the ``.env`` file."""
    sources: dict[str, Mapping[str, str | None]] = {"environment": os.environ if environ is None else environ}
    path = Path(env_file)
    if path.is_file():
        from dotenv import dotenv_values

        try:
            sources[str(path)] = dotenv_values(path)
        except (OSError, UnicodeError):
            pass
    lines = unknown_variables(sources)
    for line in lines:
        log.warning("%s", line)
    return lines


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
    if settings.auth_mode == "development" and cognito_configured(settings):
        raise ConfigError(
            "PIE_AUTH_MODE=development is set while Cognito is configured: unset one of them "
            "(PIE_ALLOW_DEV_TOKENS_WITH_COGNITO=true accepts development tokens next to Cognito's)"
        )
    if settings.jwt_secret and cognito_configured(settings) and not settings.allow_dev_tokens_with_cognito:
        raise ConfigError(
            "PIE_JWT_SECRET is set while Cognito is configured: unset it (anyone knowing it could mint "
            "admin tokens), or set PIE_ALLOW_DEV_TOKENS_WITH_COGNITO=true to accept development tokens too"
        )


def is_loopback_host(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8, ::1):
    ``0.0.0.0``, ``::`` and an empty host (every interface) are not."""
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    try:
        return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)
    except ValueError:
        return False


def generated_secret_mode(settings: Settings) -> bool:
    """Neither Cognito nor PIE_JWT_SECRET: development tokens signed with a secret `pie serve`
    generates under PIE_DATA_DIR (zero-setup local mode)."""
    return not settings.jwt_secret and not cognito_configured(settings)


def development_auth(settings: Settings) -> bool:
    """Development (HS256) tokens are accepted: PIE_JWT_SECRET or the generated secret."""
    return bool(settings.jwt_secret) or not cognito_configured(settings)


def check_serve_auth(settings: Settings, host: str) -> None:
    """Spec 15.5: with neither Cognito nor PIE_JWT_SECRET, `pie serve` binds only a loopback
    address unless the operator opts in with PIE_AUTH_MODE=development."""
    if generated_secret_mode(settings) and settings.auth_mode != "development" and not is_loopback_host(host):
        raise ConfigError(
            f"--host/PIE_HOST={host!r} is not a loopback address and no authentication is configured "
            "(neither PIE_COGNITO_REGION/PIE_COGNITO_USER_POOL_ID nor PIE_JWT_SECRET): configure Cognito, or set "
            "PIE_AUTH_MODE=development to serve development tokens with a generated secret on this address"
        )


def development_auth_warning(settings: Settings) -> str | None:
    """The WARNING line `pie serve` logs whenever development tokens are accepted."""
    if not development_auth(settings):
        return None
    signer = "PIE_JWT_SECRET" if settings.jwt_secret else "a secret generated in PIE_DATA_DIR"
    extra = " next to Cognito's" if cognito_configured(settings) else ""
    return (
        f"development authentication is on: HS256 tokens signed with {signer} are accepted{extra}, "
        "admin tokens included (`pie token --admin`); configure Cognito for a shared deployment"
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
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE or (exc.errno == errno.EACCES and port < 1024):
                raise ConfigError(f"{flag}={port}: cannot listen on {host}:{port}: {reason}") from None
            # the address is not this machine's, or not allowed: the host is what is wrong
            raise ConfigError(f"--host/PIE_HOST={host!r}: cannot listen on this address: {reason}") from None


def display_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


# libpq/server messages of connection errors that retrying cannot fix (the database or role
# does not exist, the password or the authentication method is rejected, no CONNECT privilege):
# connection errors carry no SQLSTATE in libpq, so they are told apart by the server's words
# (English messages; a server with another lc_messages falls back to retrying)
_PERMANENT_CONNECT_ERRORS = (
    "does not exist",  # database "x" / role "x" does not exist
    "password authentication failed",
    "authentication failed for user",  # ident / peer / ldap / ...
    "no pg_hba.conf entry",
    "pg_hba.conf rejects connection",
    "no password supplied",
    "is not permitted to log in",
    "permission denied for database",
    "invalid sslmode value",
    "invalid connection option",
    "invalid integer value",
)


def is_permanent_connect_error(reason: str) -> bool:
    lowered = reason.lower()
    return any(marker in lowered for marker in _PERMANENT_CONNECT_ERRORS)


def _connect_error_reason(exc: BaseException) -> str:
    reason = " ".join(str(exc).split()) or exc.__class__.__name__
    # psycopg prefixes "connection failed: connection to server at "h", port p failed: "
    if "FATAL:" in reason:
        reason = "FATAL: " + reason.split("FATAL:", 1)[1].strip()
    return reason


def wait_for_database(url: str, timeout: float, *, interval: float = 2.0) -> None:
    """Connect once, retrying for ``timeout`` seconds with one warning line per failed attempt.

    An error retrying cannot fix (the database or role does not exist, the password is
    rejected) ends the wait at once; after the time-out the error names the first distinct
    error seen (and the last one when it differs)."""
    import psycopg

    from pie.db import libpq_url

    deadline = time.monotonic() + timeout
    attempt = 0
    seen: list[str] = []
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        try:
            with psycopg.connect(libpq_url(url), connect_timeout=max(2, min(10, int(remaining) or 2))):
                return
        except psycopg.Error as exc:
            reason = _connect_error_reason(exc)
            if reason not in seen:
                seen.append(reason)
            if is_permanent_connect_error(reason):
                raise DatabaseUnavailable(
                    f"cannot use the database {display_url(url)}: {reason} (not retried: check PIE_DATABASE_URL)"
                ) from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                detail = seen[0] if len(seen) == 1 else f"{seen[0]} (last error: {seen[-1]})"
                raise DatabaseUnavailable(
                    f"cannot use the database {display_url(url)} after {attempt} attempt(s) in "
                    f"{timeout:g}s (PIE_DB_STARTUP_TIMEOUT): {detail}"
                ) from None
            log.warning(
                "database %s not reachable (attempt %d, retrying for %.0fs more): %s",
                display_url(url),
                attempt,
                remaining,
                reason,
            )
            time.sleep(min(interval, remaining))


# connections a process holds besides its pools: the long-poll LISTEN connection (`pie serve`),
# and a dispatcher's LISTEN, claim and result-recording connections
LONG_POLL_CONNECTIONS = 1
DISPATCHER_CONNECTIONS = 3
# the webhook delivery loop beside a dispatcher (PIE_WEBHOOKS_DELIVER): LISTEN, claims, results
WEBHOOK_DELIVERY_CONNECTIONS = 3


@dataclass(frozen=True)
class ConnectionBudget:
    """The most connections one process of a command can open, and how that adds up."""

    per_process: int
    parts: str  # e.g. "PIE_DB_POOL_SIZE 10 + PIE_DB_MAX_OVERFLOW 2 + ..."


def connection_budget(settings: Settings, command: str) -> ConnectionBudget:
    """The maximum of one `pie serve` process (``command="serve"``) or `pie worker`."""
    parts = [
        ("PIE_DB_POOL_SIZE", settings.db_pool_size),
        ("PIE_DB_MAX_OVERFLOW", settings.db_max_overflow),
    ]
    if command == "serve":
        parts.append(("PIE_DB_READ_POOL_SIZE", settings.db_read_pool_size))
        parts.append(("long-poll listener", LONG_POLL_CONNECTIONS))
        if settings.run_dispatcher:
            parts.append(("dispatcher", DISPATCHER_CONNECTIONS))
    else:
        parts.append(("dispatcher", DISPATCHER_CONNECTIONS))
    if (command != "serve" or settings.run_dispatcher) and settings.webhooks_deliver:
        parts.append(("webhook delivery", WEBHOOK_DELIVERY_CONNECTIONS))
    return ConnectionBudget(sum(n for _, n in parts), " + ".join(f"{name} {n}" for name, n in parts))


_SERVER_CONNECTIONS = """
    SELECT current_setting('max_connections')::int,
           current_setting('superuser_reserved_connections')::int
             + coalesce(nullif(current_setting('reserved_connections', true), ''), '0')::int,
           (SELECT count(*) FROM pg_stat_activity
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())::int
"""


def check_connection_budget(url: str, settings: Settings, command: str, processes: int = 1) -> None:
    """Refuse to start (ConfigError, exit 2) when ``processes`` processes of ``command`` could
    open more connections than the server has left: max_connections less the reserved slots
    and the connections other sessions hold now. PIE_DB_CHECK_CONNECTIONS=false logs it instead."""
    import psycopg

    from pie.db import libpq_url

    budget = connection_budget(settings, command)
    try:
        with psycopg.connect(libpq_url(url), connect_timeout=max(1, int(settings.db_connect_timeout or 5))) as conn:
            row = conn.execute(_SERVER_CONNECTIONS).fetchone()
    except psycopg.Error as exc:
        log.warning("could not read the database's max_connections (%s); connection budget not checked", exc)
        return
    assert row is not None
    max_connections, reserved, in_use = row
    left = max_connections - reserved - in_use
    total = processes * budget.per_process
    if total <= left:
        log.info(
            "database connections: at most %d for %d process(es), %d left on the server (max_connections %d)",
            total,
            processes,
            left,
            max_connections,
        )
        return
    line = (
        f"database connections: {processes} process(es) x {budget.per_process} ({budget.parts}) = {total} "
        f"> {left} left on the server (max_connections {max_connections} - {reserved} reserved - {in_use} in use)"
    )
    if not settings.db_check_connections:
        log.warning("%s; starting anyway (PIE_DB_CHECK_CONNECTIONS=false)", line)
        return
    raise ConfigError(
        f"{line}: lower PIE_DB_POOL_SIZE / PIE_DB_MAX_OVERFLOW"
        + (" / PIE_DB_READ_POOL_SIZE or --workers" if command == "serve" else "")
        + ", or raise max_connections (PIE_DB_CHECK_CONNECTIONS=false starts anyway)"
    )
