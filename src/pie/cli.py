"""``pie`` command line: serve, worker, migrate, token."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from pie.config import get_settings


def _configure_logging() -> None:
    logging.basicConfig(
        level=get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pgserver logs every pg_ctl invocation with its full output at INFO; alembic its plugins
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _exit_gracefully(signum: int, frame: object) -> None:
    raise SystemExit(0)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pie.app import create_app
    from pie.embedded import resolve_database_url
    from pie.httpserver import uvicorn_options

    settings = get_settings()
    # embedded: started (and always migrated) here; an external database unless --no-migrate
    url = resolve_database_url(settings, migrate=not (settings.database_url and args.no_migrate))
    app = create_app(settings, database_url=url)
    # uvicorn shuts down gracefully on SIGTERM and then re-raises it; exit normally instead of
    # dying by the signal, so atexit handlers run (they stop the embedded PostgreSQL)
    signal.signal(signal.SIGTERM, _exit_gracefully)
    host = args.host or settings.host
    port = args.port or settings.port
    print(f"PIE v2 listening on http://{host}:{port}  (docs: /v2/docs)", flush=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=(args.log_level or settings.log_level).lower(),
        proxy_headers=True,
        **uvicorn_options(settings),  # header size, request/keep-alive timeouts, concurrency cap
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from pie.dispatch.worker import run_worker

    settings = get_settings()
    asyncio.run(run_worker(settings, name=args.name))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from pie.embedded import resolve_database_url
    from pie.migrate import downgrade, upgrade

    settings = get_settings()
    url = resolve_database_url(settings, migrate=False)
    if args.down or args.revision.startswith("-"):
        target = "base" if args.revision == "head" else args.revision
        downgrade(url, target)
        print(f"database migrated down to {target}")
    else:
        upgrade(url, args.revision)
        print(f"database migrated up to {args.revision}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from pie.auth import mint_dev_token

    settings = get_settings()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pie", description="PIE v2 server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the API (embedded PostgreSQL when PIE_DATABASE_URL is unset)")
    serve.add_argument("--host", default=None, help="bind address (PIE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (PIE_PORT, default 8000)")
    serve.add_argument("--log-level", default=None, help="uvicorn log level (PIE_LOG_LEVEL, default info)")
    serve.add_argument("--no-migrate", action="store_true", help="do not migrate PIE_DATABASE_URL on start")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run a standalone job dispatcher")
    worker.add_argument("--name", default=None, help="dispatcher name (default: host:pid)")
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser("migrate", help="migrate the database to head (or a revision)")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.add_argument("--down", action="store_true", help="downgrade to REVISION (default base)")
    migrate.set_defaults(func=cmd_migrate)

    token = sub.add_parser("token", help="print a development token signed with PIE_JWT_SECRET")
    token.add_argument("--admin", action="store_true", help="grant streamline/admin")
    token.add_argument("--scope", action="append", default=[], help="scope (streamline/ prefix optional); repeatable")
    token.add_argument("--group", action="append", default=[], help="cognito group, e.g. client:sealink; repeatable")
    token.add_argument("--client-id", default=None, help="client_id claim (machine token tenant)")
    token.add_argument("--sub", default="pie-dev-user")
    token.add_argument("--username", default=None, help="username claim (marks a human token)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.set_defaults(func=cmd_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        # imported here: `pie token` stays fast
        from alembic.util.exc import CommandError
        from sqlalchemy.exc import OperationalError

        from pie.migrate import MigrationsNotFound

        if isinstance(exc, (CommandError, MigrationsNotFound)):  # e.g. an unknown revision
            print(f"pie {args.command}: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, OperationalError):  # the database cannot be reached
            print(f"pie {args.command}: cannot use the database: {exc.orig or exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
