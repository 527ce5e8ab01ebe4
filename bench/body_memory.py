"""Peak memory a `pie serve` process spends to accept one JSON body (issue #10 target: a 1 MB
body costs at most ~10 MB of peak RSS).

Starts `pie serve` on a scratch database (created on the server of --database-url,
PIE_BENCH_DATABASE_URL, PIE_TEST_DATABASE_URL or the local PostgreSQL, and dropped afterwards), then for each body size and shape: resets the
process's peak RSS (``/proc/PID/clear_refs`` 5), posts one direct-inference request whose
``input`` is that large, and reads ``VmHWM`` (peak) against ``VmRSS`` just before. The baseline
is the same measurement for a tiny body in the same run; each line prints the extra peak in MB
and its ratio to the body size.

    .venv/bin/python bench/body_memory.py [--sizes 0.1,1,5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def body_of(shape: str, size: int) -> bytes:
    rnd = random.Random(7)
    if shape == "numbers":
        n = size // 12  # rows of 1000 numbers (PIE_JSON_MAX_ITEMS bounds one array)
        value = {"values": [[round(rnd.random() * 1000, 6) for _ in range(1000)] for _ in range(max(1, n // 1000))]}
    elif shape == "records":
        n = size // 64
        value = {"rows": [{"id": i, "route": "Adelaide to Sydney", "price": rnd.random()} for i in range(n)]}
    else:  # one long string
        value = {"blob": "x" * size}
    return json.dumps({"input": value}).encode()


def measure(http: httpx.Client, pid: int, url: str, body: bytes, headers: dict[str, str]) -> float:
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = proc_kb(pid, "VmRSS")
    r = http.post(url, content=body, headers={**headers, "content-type": "application/json"})
    assert r.status_code == 202, r.text[:300]
    time.sleep(0.05)
    return (proc_kb(pid, "VmHWM") - before) / 1024


class Server:
    """`pie serve` on the scratch database, with a model `m` version `1` to infer on."""

    def __init__(self, env: dict[str, str], data_dir: str, pie: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = Path(data_dir) / f"serve-{self.port}.log"
        self.proc = subprocess.Popen(
            [pie, "serve", "--port", str(self.port)],
            env=env,
            cwd=data_dir,
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
        )
        for _ in range(300):
            try:
                if httpx.get(f"{self.base}/v2/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        self.infer = f"{self.base}/v2/models/m/versions/1/inference"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--database-url",
        default=os.environ.get("PIE_BENCH_DATABASE_URL")
        or os.environ.get("PIE_TEST_DATABASE_URL")
        or "postgresql://postgres@127.0.0.1:5432/postgres",
    )
    parser.add_argument("--sizes", default="0.1,1,5", help="body sizes in MB")
    parser.add_argument("--shapes", default="numbers,records,string")
    parser.add_argument("--repeat", type=int, default=1, help="fresh servers per measurement (the minimum is kept)")
    args = parser.parse_args()

    name = f"pie_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = args.database_url.rsplit("/", 1)[0] + "/" + name
    data_dir = tempfile.mkdtemp(prefix="pie-bench-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIE_")}
    env.update(
        PIE_DATABASE_URL=url,
        PIE_RUN_DISPATCHER="false",
        PIE_JWT_SECRET="bench",
        PIE_LOG_LEVEL="warning",
        PIE_DATA_DIR=data_dir,
    )
    pie = str(Path(sys.executable).with_name("pie"))
    subprocess.run([pie, "migrate"], env=env, cwd=data_dir, check=True, capture_output=True)
    token = subprocess.run(
        [pie, "token", "--admin"], env=env, cwd=data_dir, capture_output=True, text=True, check=True
    ).stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    handlers = {
        "inference": {"type": "in_process", "value": "echo"},
        "training": {"type": "in_process", "value": "echo"},
    }

    def one(body: bytes) -> float:
        """Extra peak RSS (MB) of accepting ``body`` on a fresh, warmed-up server."""
        server = Server(env, data_dir, pie)
        try:
            with httpx.Client(timeout=120) as http:
                tiny = body_of("numbers", 200)
                for _ in range(5):  # warm up (imports, pools, caches)
                    measure(http, server.proc.pid, server.infer, tiny, headers)
                return measure(http, server.proc.pid, server.infer, body, headers)
        except Exception:
            print(server.log.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            server.stop()

    try:
        with httpx.Client(timeout=60) as http:
            setup = Server(env, data_dir, pie)
            try:
                http.post(
                    f"{setup.base}/v2/models",
                    json={"id": "m", "name": "m", "description": "", "handlers": handlers},
                    headers=headers,
                ).raise_for_status()
                http.post(
                    f"{setup.base}/v2/models/m/new_version", json={"version": "1"}, headers=headers
                ).raise_for_status()
            finally:
                setup.stop()
        baseline = min(one(body_of("numbers", 200)) for _ in range(args.repeat))
        print(f"baseline (200-byte body): {baseline:.1f} MB extra peak RSS")
        print(f"{'shape':8} {'body MB':>8} {'extra peak MB':>14} {'over baseline':>14} {'x body':>7}")
        for shape in args.shapes.split(","):
            for size_mb in (float(s) for s in args.sizes.split(",")):
                body = body_of(shape, int(size_mb * MB))
                extra = min(one(body) for _ in range(args.repeat))
                over = extra - baseline
                print(
                    f"{shape:8} {len(body) / MB:8.2f} {extra:14.1f} {over:14.1f} {over / (len(body) / MB):7.1f}",
                    flush=True,
                )
    finally:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
