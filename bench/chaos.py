"""Chaos run (not part of the test suite): ``pie serve`` (+ optionally a ``pie worker``) on a
PostgreSQL cluster of its own, under a bounded load of in-process jobs, loopback only.

1. load: a client launches direct-inference jobs at a steady rate until the phases below are
   over (at most ``--jobs``); each 202 is an *acked* job. The in-process handler
   ``chaos_record`` appends ``<pid> <job_id>`` to a file and sleeps ``--job-seconds``, so jobs
   are mid-run when things break;
2. ``kill -9`` of ``pie serve`` (and of the worker) once ``--kill-after`` jobs are acked, restart
   at once (default settings): time to recover = from the restart until every job the dead
   dispatchers held is running again (claimed anew) or ended;
3. ``pg_ctl stop`` of PostgreSQL for ``--outage`` seconds once ``--stop-after`` jobs are acked,
   then start;
4. ``SIGSTOP`` of every PostgreSQL process for ``--freeze`` seconds, once the dispatchers claim
   again after the outage while jobs wait (the server accepts TCP but answers nothing; longer
   than the dispatchers' response guard, statement + connect timeout = 35 s, so they give up on
   statements the server still runs when it thaws), then ``SIGCONT``: time to recover = from the
   thaw until jobs are claimed again and every job claimed (``started``, leased) three seconds
   after the thaw is running again (claimed anew) or ended -- a claim the server committed after
   its dispatcher gave up on it used to keep its jobs ``started`` until their lease ran out (300 s);
5. the load stops; wait until every acked job ended; print acked, lost (acked but missing or not
   success), run twice (a job run more than once although its earlier run was not in a killed
   process: a result dropped or a job requeued while its dispatcher was alive -- must be 0), the
   times to recover (each must be <= 15 s).

    .venv/bin/python bench/chaos.py [--jobs 2000] [--rate 15] [--job-seconds 0.5] [--outage 10] [--freeze 45] [--worker]

Everything is bounded: the run stops by itself (``--max-seconds``) and removes its cluster.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from pgcluster import OwnCluster  # noqa: E402

SECRET = "chaos-secret"
SERVE_CODE = """
import os, sys, time
from pie.dispatch.inprocess import register

LOG = os.environ["CHAOS_RECORD"]
SLEEP = float(os.environ["CHAOS_SLEEP"])

@register("chaos_record")
def record(payload):
    with open(LOG, "a") as f:
        f.write(f"{os.getpid()} {payload['job_id']}\\n")
    time.sleep(SLEEP)
    return {"pid": os.getpid()}

from pie.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    def __init__(self, args: argparse.Namespace, pg: OwnCluster, workdir: Path):
        self.args = args
        self.pg = pg
        self.workdir = workdir
        self.record = workdir / "invocations.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PIE_")},
            "PIE_DATABASE_URL": pg.url,
            "PIE_JWT_SECRET": SECRET,
            "PIE_LOG_LEVEL": "warning",
            "PIE_DATA_DIR": str(workdir),
            "CHAOS_RECORD": str(self.record),
            "CHAOS_SLEEP": str(args.job_seconds),
        }
        self.acked: list[str] = []
        self.launched = 0
        self.refused = Counter()
        self.killed_pids: set[int] = set()
        self.stop_load = threading.Event()
        self.logs: list = []

    def spawn(self, *cli: str) -> subprocess.Popen:
        log = open(self.workdir / f"{cli[0]}-{len(self.logs)}.log", "w")
        self.logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-c", SERVE_CODE, *cli],
            env=self.env,
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def start_serve(self) -> tuple[subprocess.Popen, float]:
        proc = self.spawn("serve", "--host", "127.0.0.1", "--port", str(self.port))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v2/health", timeout=1).status_code == 200:
                    return proc, time.monotonic()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("pie serve did not start")

    def token(self) -> str:
        from pie.auth import mint_dev_token
        from pie.config import Settings

        return mint_dev_token(Settings(_env_file=None, jwt_secret=SECRET), admin=True, ttl=3600)

    def seed(self, headers: dict[str, str]) -> None:
        handlers = {
            "inference": {"type": "in_process", "value": "chaos_record"},
            "training": {"type": "in_process", "value": "chaos_record"},
        }
        with psycopg.connect(self.pg.url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO models (id, name, handlers, status) VALUES ('chaos', 'chaos', %s, 'active')",
                (psycopg.types.json.Jsonb(handlers),),
            )
            conn.execute(
                "INSERT INTO model_versions (model_id, version, status, handlers) VALUES ('chaos', '1', 'active', %s)",
                (psycopg.types.json.Jsonb(handlers),),
            )

    def load(self, headers: dict[str, str]) -> None:
        interval = 1.0 / self.args.rate
        with httpx.Client(timeout=10) as client:
            for n in range(self.args.jobs):
                if self.stop_load.is_set():
                    return
                t0 = time.monotonic()
                self.launched += 1
                try:
                    r = client.post(
                        f"{self.url}/v2/models/chaos/versions/1/inference", json={"input": {"n": n}}, headers=headers
                    )
                    if r.status_code == 202:
                        self.acked.append(r.json()["inference_job_id"])
                    else:
                        self.refused[r.status_code] += 1
                except httpx.HTTPError as exc:
                    self.refused[exc.__class__.__name__] += 1
                time.sleep(max(0.0, interval - (time.monotonic() - t0)))

    def query(self, sql: str, *params) -> list:
        with psycopg.connect(self.pg.url, connect_timeout=2) as conn:
            return conn.execute(sql, params).fetchall()

    def recovered(self, held: dict[str, object], since: float, timeout: float = 60.0) -> float | None:
        """Seconds from ``since`` until every job of ``held`` (job id -> its started_at) ended or
        was claimed anew (a new started_at), or None if not within ``timeout``."""
        if not held:
            return 0.0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                rows = self.query("SELECT job_id, status, started_at FROM jobs WHERE job_id = ANY(%s)", list(held))
            except psycopg.Error:
                rows = None
            if rows is not None and all(
                status in ("success", "failure") or started_at != held[job_id] for job_id, status, started_at in rows
            ):
                return time.monotonic() - since
            time.sleep(0.1)
        return None

    def claims_after(self, moment: object, since: float, timeout: float = 60.0) -> float | None:
        """Seconds from ``since`` until a job is claimed after the database time ``moment`` (or
        no job waits), or None if not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ((claimed, pending),) = self.query(
                    "SELECT count(*) FILTER (WHERE started_at > %s), count(*) FILTER (WHERE status = 'pending') "
                    "FROM jobs",
                    moment,
                )
            except psycopg.Error:
                claimed = pending = None
            if claimed or pending == 0:
                return time.monotonic() - since
            time.sleep(0.1)
        return None

    def held_jobs(self) -> dict[str, object]:
        """Claimed jobs (``started``, leased: in-process, or not yet handed over) -> started_at."""
        return dict(
            self.query("SELECT job_id, started_at FROM jobs WHERE status = 'started' AND lease_expires_at IS NOT NULL")
        )

    def log_lines(self, marker: str) -> int:
        return sum(path.read_text(errors="replace").count(marker) for path in self.workdir.glob("*.log"))

    def invocations(self) -> list[tuple[int, str]]:
        if not self.record.exists():
            return []
        return [(int(p), j) for p, j in (line.split() for line in self.record.read_text().splitlines() if line.strip())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="most launches (the load stops after the phases)")
    parser.add_argument("--kill-after", type=int, default=90, help="kill -9 once this many jobs are acked")
    parser.add_argument("--stop-after", type=int, default=180, help="stop PostgreSQL once this many jobs are acked")
    parser.add_argument("--rate", type=float, default=15.0, help="job launches per second")
    parser.add_argument("--job-seconds", type=float, default=0.5)
    parser.add_argument("--outage", type=float, default=10.0, help="seconds PostgreSQL is stopped")
    parser.add_argument(
        "--freeze", type=float, default=45.0, help="seconds PostgreSQL is frozen with SIGSTOP (0: no freeze phase)"
    )
    parser.add_argument("--worker", action="store_true", help="also run a pie worker (killed -9 with the server)")
    parser.add_argument("--max-seconds", type=float, default=420.0)
    args = parser.parse_args()
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="pie-chaos-"))
    procs: list[subprocess.Popen] = []
    with OwnCluster() as pg:
        run = Run(args, pg, workdir)
        from pie.migrate import upgrade

        upgrade(pg.url)
        try:
            serve, _ = run.start_serve()
            procs.append(serve)
            headers = {"Authorization": f"Bearer {run.token()}"}
            run.seed(headers)
            if args.worker:
                procs.append(run.spawn("worker", "--name", "chaos-worker"))
            loader = threading.Thread(target=run.load, args=(headers,), daemon=True)
            loader.start()

            # --- kill -9 mid-load, restart at once
            while len(run.acked) < args.kill_after and loader.is_alive():
                time.sleep(0.1)
            victims = [p for p in procs if p.poll() is None]
            for p in victims:
                p.send_signal(signal.SIGKILL)
                p.wait()
                run.killed_pids.add(p.pid)
            held = run.query(
                "SELECT job_id, attempts FROM jobs WHERE status = 'started' AND lease_expires_at IS NOT NULL"
            )
            killed_at = time.monotonic()
            serve, restarted_at = run.start_serve()
            restart_took = restarted_at - killed_at
            procs = [serve]
            if args.worker:
                procs.append(run.spawn("worker", "--name", "chaos-worker"))
            attempts_at_kill = dict(held)
            recover = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                rows = run.query(
                    "SELECT job_id, status, attempts FROM jobs WHERE job_id = ANY(%s)", list(attempts_at_kill)
                )
                if all(
                    status in ("success", "failure") or attempts > attempts_at_kill[job_id]
                    for job_id, status, attempts in rows
                ):
                    recover = time.monotonic() - restarted_at
                    break
                time.sleep(0.1)

            # --- PostgreSQL stopped mid-load
            while len(run.acked) < args.stop_after and loader.is_alive():
                time.sleep(0.1)
            pg.stop()
            outage_began = time.monotonic()
            time.sleep(args.outage)
            pg.start()
            outage = time.monotonic() - outage_began

            # --- PostgreSQL frozen (SIGSTOP) mid-load, then thawed
            freeze_recover: float | None = 0.0
            frozen_for = 0.0
            queued: dict[str, int] = {}
            resumed = held_recover = None
            loader_alive_at_freeze = False
            held_after_thaw: dict[str, object] = {}
            if args.freeze > 0:
                # ... once the dispatchers claim again after the outage, while jobs wait: a claim
                # is likely on the wire when the server freezes
                freeze_wait = time.monotonic() + 60
                while loader.is_alive() and time.monotonic() < freeze_wait:
                    ((pending, claiming),) = run.query(
                        "SELECT count(*) FILTER (WHERE status = 'pending'), "
                        "count(*) FILTER (WHERE started_at > now() - interval '1 second') FROM jobs"
                    )
                    if pending >= 4 and claiming:
                        break
                    time.sleep(0.02)
                queued = dict(run.query("SELECT status, count(*) FROM jobs GROUP BY status"))
                loader_alive_at_freeze = loader.is_alive()
                pg.freeze()
                frozen_at = time.monotonic()
                try:
                    time.sleep(args.freeze)
                finally:
                    pg.thaw()
                thawed_at = time.monotonic()
                frozen_for = thawed_at - frozen_at
                (thawed_db,) = run.query("SELECT now()")[0]
                # dispatching resumes: a job is claimed after the thaw (or none is left waiting)
                resumed = run.claims_after(thawed_db, thawed_at)
                # statements the dispatchers gave up on during the freeze run now: what they
                # claimed shows up as `started` within moments of the thaw
                time.sleep(max(0.0, 3.0 - (time.monotonic() - thawed_at)))
                held_after_thaw = run.held_jobs()
                held_recover = run.recovered(held_after_thaw, thawed_at)
                freeze_recover = None if resumed is None or held_recover is None else max(resumed, held_recover)

            run.stop_load.set()  # the phases are over
            loader.join(timeout=max(1.0, args.max_seconds - (time.monotonic() - began)))
            # --- every acked job ends
            deadline = began + args.max_seconds
            ended = {}
            while time.monotonic() < deadline:
                rows = run.query("SELECT job_id, status FROM jobs WHERE job_id = ANY(%s)", run.acked)
                ended = {job_id: status for job_id, status in rows}
                if len(ended) == len(run.acked) and all(s in ("success", "failure") for s in ended.values()):
                    break
                time.sleep(0.5)
            lost = [j for j in run.acked if ended.get(j) != "success"]
            calls = run.invocations()
            per_job: dict[str, list[int]] = {}
            for pid, job_id in calls:
                per_job.setdefault(job_id, []).append(pid)
            rerun_after_kill = [j for j, pids in per_job.items() if len(pids) > 1 and pids[0] in run.killed_pids]
            twice = [j for j, pids in per_job.items() if len(pids) > 1 and pids[0] not in run.killed_pids]
            print(
                f"chaos run: {run.launched} launches at {args.rate:g}/s, handler {args.job_seconds:g} s, "
                f"{'serve + worker' if args.worker else 'serve'}, own PostgreSQL cluster"
            )
            print(f"acked jobs:                 {len(run.acked)}  (refused: {dict(run.refused)})")
            print(f"lost (acked, not success):  {len(lost)}  {lost[:5]}")
            print(f"run twice (not killed run): {len(twice)}  {twice[:5]}")
            print(f"killed mid-run, run again:  {len(rerun_after_kill)}  (their first run died with its process)")
            print(f"jobs held by killed procs:  {len(attempts_at_kill)}")
            print(
                f"time to recover after kill: {'NOT RECOVERED in 60 s' if recover is None else f'{recover:.2f} s'} "
                f"(restart -> every held job running again or ended)"
            )
            print(
                f"pie serve restart took:     {restart_took:.2f} s (kill -> healthy again; launches meanwhile are refused)"
            )
            print(f"PostgreSQL stopped for:     {outage:.1f} s")
            print(f"total:                      {time.monotonic() - began:.1f} s")
            if args.freeze > 0:
                print(
                    f"time to recover after freeze: "
                    f"{'NOT RECOVERED in 60 s' if freeze_recover is None else f'{freeze_recover:.2f} s'} "
                    f"(thaw -> dispatching again: {'-' if resumed is None else f'{resumed:.2f} s'}, and every job "
                    f"claimed 3 s after it ({len(held_after_thaw)}) running again or ended: "
                    f"{'-' if held_recover is None else f'{held_recover:.2f} s'})"
                )
                print(
                    f"PostgreSQL frozen for:      {frozen_for:.1f} s (SIGSTOP; jobs then: {queued}, "
                    f"{'under load' if loader_alive_at_freeze else 'after the load'})"
                )
                print(
                    f"late claims released:       {run.log_lines('claimed by a statement it had given up on')} "
                    "(a claim the server ran after its dispatcher gave up on it, put back in the queue)"
                )
            ok = (
                not lost
                and not twice
                and recover is not None
                and recover <= 15
                and freeze_recover is not None
                and freeze_recover <= 15
            )
            print("RESULT:", "OK" if ok else "FAILED")
            return 0 if ok else 1
        finally:
            run.stop_load.set()
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        p.kill()
            for log in run.logs:
                log.close()
            if os.environ.get("PIE_CHAOS_KEEP"):
                print("logs kept in", workdir)
            else:
                import shutil

                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
