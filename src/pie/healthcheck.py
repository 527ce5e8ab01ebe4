"""The container health check of the image (Dockerfile ``HEALTHCHECK``): ``python -m pie.healthcheck``.

It probes ``GET /v2/health/ready`` of the ``pie serve`` the container runs, at the port that
server listens on: ``--port`` of the container's command, else ``PIE_PORT``, else 8000 (so
``docker run -e PIE_PORT=9000`` moves the probe with the server). The same image runs
``pie worker`` and ``pie migrate``, which serve no HTTP: for them the check passes without
probing (a health check is off for them, whatever the orchestrator's defaults).

Standard library only: it runs every few seconds and must not import the application.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

WILDCARD_HOSTS = {"", "0.0.0.0", "::"}


def command_line(pid: int) -> list[str]:
    """The command line of process ``pid`` (PID 1: the container's command), [] if unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def pie_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the ``pie`` subcommand of ``argv``, its arguments), or (None, []) when it runs no ``pie``
    (``docker run --init`` puts an init process first: its arguments are searched too)."""
    for i, arg in enumerate(argv):
        if os.path.basename(arg) == "pie" or (arg == "pie.cli" and i > 0 and argv[i - 1] == "-m"):
            rest = argv[i + 1 :]
            return (rest[0], rest[1:]) if rest else (None, [])
    return None, []


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def probe_url(args: list[str], environ: Mapping[str, str]) -> str:
    """The readiness URL of the server started with ``args`` in environment ``environ``."""
    port = _flag(args, "--port") or environ.get("PIE_PORT") or "8000"
    host = _flag(args, "--host") or environ.get("PIE_HOST") or "127.0.0.1"
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port.strip()}/v2/health/ready"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pie.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, default=1, help="the process whose command is checked (default 1)")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer")
    options = parser.parse_args(argv)
    command, args = pie_command(command_line(options.pid))
    if command is not None and command != "serve":
        print(f"pie {command} serves no HTTP: nothing to check")
        return 0
    url = probe_url(args, os.environ)
    try:
        with urllib.request.urlopen(url, timeout=options.timeout) as response:
            print(f"{url}: {response.status}")
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"{url}: {exc.code} {exc.read()[:300].decode(errors='replace')}")
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
