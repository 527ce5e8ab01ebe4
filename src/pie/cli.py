"""``pie`` command line: serve, worker, migrate, token, keys.

Every command reads and checks its configuration first (:mod:`pie.startup`): a mistake is one
line naming the ``PIE_*`` variable or the flag, exit code 2, before anything is started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import logging.config
import os
import signal
import sys
from typing import TYPE_CHECKING

from pie.config import Settings, get_settings
from pie.startup import (
    ConfigError,
    DatabaseUnavailable,
    auth_mode,
    check_auth,
    check_connection_budget,
    check_data_dir,
    check_port,
    check_serve_auth,
    check_settings,
    development_auth_warning,
    is_loopback_host,
    load_settings,
    wait_for_database,
    warn_unknown_variables,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("pie.cli")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _log_config(level: str | None = None) -> dict:
    """The one logging configuration (PIE_LOG_FORMAT, PIE_LOG_LEVEL) of the CLI and the server
    (uvicorn applies it in every --workers process)."""
    from pie.logconfig import lighten_log_records, logging_config

    lighten_log_records()  # this process's records (each --workers process builds its config here)
    settings = get_settings()
    return logging_config(settings.log_format, (level or settings.log_level).lower())


def _configure_logging(level: str | None = None) -> None:
    logging.config.dictConfig(_log_config(level))
    logging.captureWarnings(True)  # a Python warning is a log line of the same format


def _uvicorn_operations_options(settings, level: str | None = None) -> dict:
    """uvicorn options of the operations setup: PIE's log format (and access log instead of
    uvicorn's), and the shutdown grace period for in-flight requests."""
    return {
        "log_config": _log_config(level),
        "access_log": False,
        "timeout_graceful_shutdown": max(int(settings.shutdown_grace_seconds + 0.999), 1),
    }


def _exit_gracefully(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _database_url(settings: Settings) -> str:
    """PIE_DATABASE_URL or the embedded database (started, not migrated), once reachable."""
    from pie.embedded import start_embedded

    url = settings.database_url or start_embedded(settings.data_dir)
    wait_for_database(url, settings.db_startup_timeout)
    return url


def app_factory() -> FastAPI:
    """The app of one ``pie serve --workers N`` process (uvicorn imports it by name in each
    worker process; the parent passed the database URL in PIE_DATABASE_URL)."""
    from pie.app import create_app

    settings = get_settings()
    _configure_logging(settings.log_level)
    return create_app(settings)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from pie.http.limits import uvicorn_options
    from pie.migrate import current_revision, head_revision, upgrade

    host = args.host or settings.host
    port = args.port or settings.port
    workers = args.workers if args.workers is not None else settings.workers
    log_level = (args.log_level or settings.log_level).lower()
    if args.log_level and log_level not in LOG_LEVELS:
        raise ConfigError(f"--log-level={args.log_level!r} is invalid: use one of {', '.join(LOG_LEVELS)}")
    if not 1 <= workers <= 64:
        raise ConfigError(f"--workers={workers} is invalid: use 1..64 (PIE_WORKERS)")
    check_settings(settings)
    check_serve_auth(settings, host)  # before anything binds the address
    check_port(host, port)  # before the database starts
    log.info("auth mode: %s", auth_mode(settings))
    if warning := development_auth_warning(settings):
        log.warning("%s", warning)

    url = _database_url(settings)
    check_connection_budget(url, settings, "serve", workers)
    if args.no_migrate:
        current, head = current_revision(url), head_revision()
        if current != head:
            log.warning("--no-migrate: the database is at revision %r, the code expects %r", current or "(empty)", head)
    else:
        upgrade(url)  # under the migration advisory lock: concurrent starts migrate once
        log.info("database schema at revision %s", head_revision())

    # uvicorn shuts down gracefully on SIGTERM and then re-raises it; exit normally instead of
    # dying by the signal, so atexit handlers run (they stop the embedded PostgreSQL)
    signal.signal(signal.SIGTERM, _exit_gracefully)
    from pie.console.signin import issue_signin_code, local_mode
    from pie.logconfig import announce, json_logging

    shown = f"[{host}]" if ":" in host else host
    announce(f"PIE v2 listening on http://{shown}:{port}  (docs: /v2/docs, {workers} process(es))")
    if local_mode(settings):
        # the one-time admin link: only to a console on this machine (loopback), and never into
        # shipped JSON logs
        if is_loopback_host(host) and not json_logging():
            code = issue_signin_code(settings)
            print(
                f"Console: http://{shown}:{port}/console/login/once?code={code}  (one-time sign-in link, 10 minutes)",
                flush=True,
            )
        else:
            log.info("console sign-in: paste a token from `pie token --admin` (run with this PIE_DATA_DIR)")
    # HTTP limits (header size, request/keep-alive timeouts, concurrency cap) and the operations
    # setup (log format, access log, shutdown grace period)
    options = {**uvicorn_options(settings), **_uvicorn_operations_options(settings, log_level)}
    if workers == 1:
        from pie.app import create_app

        app = create_app(settings, database_url=url)
        uvicorn.run(app, host=host, port=port, log_level=log_level, proxy_headers=True, **options)
    else:
        from pie import metrics

        # prometheus-client's multiprocess mode: every worker writes its samples under one
        # directory, a scrape sums them (set before the worker processes start)
        metrics.prepare_multiprocess(settings.data_dir / "metrics")
        # uvicorn's multi-process mode: the parent binds the port and supervises N processes that
        # each import the app factory (and run their own dispatcher, see the README)
        os.environ["PIE_DATABASE_URL"] = url
        os.environ["PIE_LOG_LEVEL"] = log_level
        uvicorn.run(
            "pie.cli:app_factory",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            proxy_headers=True,
            **options,
        )
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from pie import db
    from pie.dispatch.worker import run_worker

    check_settings(settings)
    url = _database_url(settings)
    check_connection_budget(url, settings, "worker")
    db.init_engine(url)
    # uvloop (installed with uvicorn[standard], as `pie serve` uses it) where available: a
    # dispatcher's event loop spends a good part of each job in the loop machinery
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(run_worker(settings, name=args.name))
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from pie.logconfig import announce
    from pie.migrate import downgrade, upgrade

    check_settings(settings)
    url = _database_url(settings)
    if args.down or args.revision.startswith("-"):
        target = "base" if args.revision == "head" else args.revision
        downgrade(url, target)
        announce(f"database migrated down to {target}")
    else:
        upgrade(url, args.revision)
        announce(f"database migrated up to {args.revision}")
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    from pie.auth import DEV_SECRET_FILE, PERMISSIONS, SCOPE_PREFIX, mint_dev_token
    from pie.logconfig import announce

    for scope in args.scope:
        name = scope[len(SCOPE_PREFIX) :] if scope.startswith(SCOPE_PREFIX) else scope
        if name not in PERMISSIONS:
            raise ConfigError(f"--scope {scope!r} is not a PIE scope: use {', '.join(PERMISSIONS)}")
    check_auth(settings)
    if not settings.jwt_secret:
        if settings.cognito_jwks_url:
            raise ConfigError("Cognito is configured and PIE_JWT_SECRET is not set: PIE mints no development tokens")
        # the secret `pie serve` generated under its PIE_DATA_DIR; never a new one here, so the
        # two cannot silently disagree
        secret_file = check_data_dir(settings) / DEV_SECRET_FILE
        if not secret_file.is_file():
            raise ConfigError(
                f"PIE_DATA_DIR={str(settings.data_dir)!r}: no development secret at {secret_file}; "
                "use the PIE_DATA_DIR of `pie serve` (it creates the secret) or set PIE_JWT_SECRET"
            )
        announce(f"pie token: signed with the secret in {secret_file}", stream=sys.stderr)
    try:
        token = mint_dev_token(
            settings,
            scopes=args.scope,
            groups=args.group,
            client_id=args.client_id,
            subject=args.sub,
            username=args.username,
            ttl=args.ttl,
            admin=args.admin,
        )
    except RuntimeError as exc:
        print(f"pie token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    """Callback-token signing keys (spec 14.5): list, rotate, retire."""
    from pie import db
    from pie.auth import signing_keys

    check_settings(settings)
    url = _database_url(settings)

    async def run() -> int:
        db.init_engine(url)
        lines: list[str] = []  # printed once the change has committed
        try:
            async with db.sessionmaker()() as session, session.begin():
                if args.action == "rotate":
                    new_key = await signing_keys.rotate(session)
                    lines.append(
                        f"new signing key {new_key.kid}: it signs every callback token from now on, in every "
                        "process; older keys keep verifying until retired"
                    )
                elif args.action == "retire":
                    try:
                        key = await signing_keys.retire(session, args.kid, force=args.force)
                    except (LookupError, ValueError) as exc:
                        print(f"pie keys retire: {exc.args[0]}", file=sys.stderr)
                        return 2
                    lines.append(
                        f"signing key {key.kid} retired: it signs nothing more, in any process, and callback "
                        "tokens it signed are refused from now on"
                    )
                else:
                    keys = await signing_keys.list_keys(session)
                    current = next((k.kid for k in reversed(keys) if k.retired_at is None), None)
                    for key in keys:
                        state = (
                            "retired " + key.retired_at.isoformat()
                            if key.retired_at
                            else ("active, signing" if key.kid == current else "active")
                        )
                        lines.append(f"{key.kid}  created {key.created_at.isoformat()}  {state}")
                    if not keys:
                        lines.append("no signing keys yet (the first dispatch creates one)")
            for line in lines:
                print(line)
            return 0
        finally:
            await db.dispose_engine()

    return asyncio.run(run())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pie", description="PIE v2 server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="migrate and serve the API (embedded PostgreSQL when PIE_DATABASE_URL is unset)"
    )
    serve.add_argument("--host", default=None, help="bind address (PIE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (PIE_PORT, default 8000)")
    serve.add_argument("--workers", type=int, default=None, help="API processes on the port (PIE_WORKERS, default 1)")
    serve.add_argument("--log-level", default=None, help="log level (PIE_LOG_LEVEL, default info)")
    serve.add_argument("--no-migrate", action="store_true", help="do not migrate the database on start")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run a standalone job dispatcher")
    worker.add_argument("--name", default=None, help="dispatcher name (default: host:pid)")
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser("migrate", help="migrate the database to head (or a revision)")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.add_argument("--down", action="store_true", help="downgrade to REVISION (default base)")
    migrate.set_defaults(func=cmd_migrate)

    token = sub.add_parser(
        "token", help="print a development token (PIE_JWT_SECRET or the secret `pie serve` generated)"
    )
    token.add_argument("--admin", action="store_true", help="grant streamline/admin")
    token.add_argument("--scope", action="append", default=[], help="scope (streamline/ prefix optional); repeatable")
    token.add_argument("--group", action="append", default=[], help="cognito group, e.g. client:sealink; repeatable")
    token.add_argument(
        "--client-id",
        default=None,
        help="client_id claim: a machine token acts for the client whose app_client_ids hold it, else the client with this id",
    )
    token.add_argument("--sub", default="pie-dev-user")
    token.add_argument("--username", default=None, help="username claim (marks a human token)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.set_defaults(func=cmd_token)

    keys = sub.add_parser("keys", help="callback-token signing keys: list, rotate, retire")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    keys_sub.add_parser("list", help="list the signing keys (newest active one signs)")
    keys_sub.add_parser("rotate", help="add a new signing key; older keys keep verifying until retired")
    retire = keys_sub.add_parser("retire", help="refuse callback tokens signed with KID from now on")
    retire.add_argument("kid")
    retire.add_argument("--force", action="store_true", help="also retire the key that currently signs")
    keys.set_defaults(func=cmd_keys)
    return parser


def _fail(prefix: str, message: str) -> None:
    """The one line of a command that cannot go on: on stderr, or a JSON record in JSON log mode
    (also when the settings could not be read but PIE_LOG_FORMAT asks for JSON)."""
    from pie.logconfig import json_logging, logging_config

    line = f"{prefix}: {message}"
    if not json_logging() and os.environ.get("PIE_LOG_FORMAT", "").strip().lower() == "json":
        logging.config.dictConfig(logging_config("json", "info"))
    if json_logging():
        log.error("%s", line)
    else:
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prefix = f"pie {args.command}"
    try:
        settings = load_settings()
        _configure_logging(settings.log_level)
        warn_unknown_variables()  # a misspelt PIE_* variable is otherwise silently ignored
        return int(args.func(args, settings) or 0)
    except ConfigError as exc:
        _fail(prefix, str(exc))
        return 2
    except DatabaseUnavailable as exc:
        _fail(prefix, str(exc))
        return 1
    except Exception as exc:
        # imported here: `pie token` stays fast
        from alembic.util.exc import CommandError
        from sqlalchemy.exc import OperationalError

        from pie.embedded import EmbeddedUnavailable
        from pie.logconfig import json_logging
        from pie.migrate import MigrationsNotFound

        if isinstance(exc, (CommandError, MigrationsNotFound, EmbeddedUnavailable)):  # e.g. an unknown revision
            _fail(prefix, str(exc))
            return 2
        if isinstance(exc, OperationalError):  # the database went away after the start-up check
            _fail(prefix, f"cannot use the database: {exc.orig or exc}")
            return 1
        if json_logging():  # the traceback as one JSON record, not plain text on stderr
            log.critical("%s: unexpected error", prefix, exc_info=exc)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
