"""PIE_LOG_FORMAT=json as a log shipper sees it (issue 18, item 11): every line a process writes
to stdout or stderr is one JSON record; a normal start has no warning noise (no Python warning
with its source line from the embedded PostgreSQL) and uvicorn's healthy lines are not logged
as `uvicorn.error`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from conftest import clean_subprocess_env, free_port, pie_command

DEV_WARNING = "development authentication is on"


def records(text: str, where: str) -> list[dict]:
    """Every non-empty line of ``text`` as a JSON record (fails on any other line)."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"{where}: a line that is not JSON: {line!r}")
        assert isinstance(record, dict) and {"level", "logger", "message", "time"} <= set(record), line
        out.append(record)
    return out


def assert_structured_and_quiet(stdout: str, stderr: str) -> list[dict]:
    lines = records(stdout, "stdout") + records(stderr, "stderr")
    assert "RuntimeDirWarning" not in stdout + stderr
    assert not [r for r in lines if r["logger"] == "uvicorn.error"], "healthy uvicorn lines logged as errors"
    assert not [r for r in lines if "color_message" in r]
    noise = [r for r in lines if r["level"] in ("WARNING", "ERROR", "CRITICAL") and DEV_WARNING not in r["message"]]
    assert not noise, noise
    return lines


def test_serve_in_json_mode_writes_only_json_and_no_warning_noise():
    """Zero-config `pie serve` (embedded PostgreSQL, generated secret, loopback) in JSON mode,
    started and stopped: only JSON records, the one expected WARNING (development auth)."""
    data_dir = Path(tempfile.mkdtemp(prefix="pie-json-logs-"))
    port = free_port()
    env = clean_subprocess_env(PIE_DATA_DIR=str(data_dir), PIE_LOG_FORMAT="json", XDG_RUNTIME_DIR=None)
    stdout_path, stderr_path = data_dir / "stdout", data_dir / "stderr"
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        process = subprocess.Popen(
            [*pie_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=data_dir,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, stderr_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "pie serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/v2/clients").status_code == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        from conftest import _stop_embedded_postmaster

        _stop_embedded_postmaster(data_dir / "pgdata")
        stdout, stderr = stdout_path.read_text(), stderr_path.read_text()
        shutil.rmtree(data_dir, ignore_errors=True)
    lines = assert_structured_and_quiet(stdout, stderr)
    messages = [r["message"] for r in lines]
    assert any(m.startswith("PIE v2 listening on http://127.0.0.1:") for m in messages)
    assert not any("login/once" in m for m in messages)  # the one-time link never goes into shipped logs
    assert [r["level"] for r in lines if DEV_WARNING in r["message"]] == ["WARNING"]
    # uvicorn's healthy lines are kept, under a logger that does not say "error"
    assert any(r["logger"] == "uvicorn.server" and r["level"] == "INFO" for r in lines)
    assert any(r["logger"] == "pie.access" and r.get("status") == 401 for r in lines)


def test_migrate_and_worker_in_json_mode_write_only_json(database_url, tmp_path):
    env = clean_subprocess_env(
        PIE_DATABASE_URL=database_url, PIE_LOG_FORMAT="json", PIE_DATA_DIR=str(tmp_path), PIE_JWT_SECRET="s"
    )
    migrated = subprocess.run(
        [*pie_command(), "migrate"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert migrated.returncode == 0, migrated.stderr
    lines = assert_structured_and_quiet(migrated.stdout, migrated.stderr)
    assert any(r["message"] == "database migrated up to head" for r in lines)

    worker = subprocess.Popen(
        [*pie_command(), "worker", "--name", "json-logs"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = worker.stderr.readline()
        deadline = time.monotonic() + 60
        seen = [first]
        while "dispatching" not in seen[-1]:
            assert time.monotonic() < deadline and seen[-1], "".join(seen)
            seen.append(worker.stderr.readline())
        worker.send_signal(signal.SIGTERM)
        stdout, stderr = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate(timeout=10)
    assert worker.returncode == 0, stderr
    lines = assert_structured_and_quiet(stdout, "".join(seen) + stderr)
    assert any(r["logger"] == "pie.worker" and "dispatching" in r["message"] for r in lines)


def test_a_fatal_start_error_is_a_json_record_too(tmp_path):
    result = subprocess.run(
        [*pie_command(), "serve", "--workers", "0"],
        env=clean_subprocess_env(PIE_LOG_FORMAT="json", PIE_DATA_DIR=str(tmp_path)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    (record,) = records(result.stdout + result.stderr, "output")
    assert record["level"] == "ERROR" and record["message"].startswith("pie serve: --workers=0 is invalid")
