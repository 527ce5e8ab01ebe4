"""examples/webhook_receiver/receiver.py, run as a process, receives and verifies real deliveries."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import free_port
from factories import init_service, tenant_setup
from test_webhooks import ROUTE, A, create_webhook, deliveries, delivering, eventually

from pie.dispatch.dispatcher import dispatch_until_idle

RECEIVER = Path(__file__).resolve().parents[1] / "examples" / "webhook_receiver" / "receiver.py"


async def test_the_example_receiver_verifies_and_handles_each_event_once(
    client, session, admin, settings, monkeypatch, tmp_path
):
    monkeypatch.setattr(settings, "webhooks_allow_http", True)
    monkeypatch.setattr(settings, "webhooks_allow_private", True)
    await tenant_setup(client, session, admin, client_id=A)
    port = free_port()
    hook = await create_webhook(client, admin, f"http://127.0.0.1:{port}/pie", ["job.succeeded"])
    out = open(tmp_path / "receiver.log", "w+")
    process = subprocess.Popen(
        [sys.executable, str(RECEIVER), "--port", str(port)],
        env={"WEBHOOK_SECRET": hook["secret"], "PATH": "/usr/bin:/bin"},
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while "receiving" not in (tmp_path / "receiver.log").read_text():
            assert time.monotonic() < deadline and process.poll() is None, (tmp_path / "receiver.log").read_text()
            time.sleep(0.05)
        # a forged delivery is refused
        forged = httpx.post(
            f"http://127.0.0.1:{port}/pie",
            content=b'{"type":"job.succeeded"}',
            headers={"webhook-id": "msg_1", "webhook-timestamp": str(int(time.time())), "webhook-signature": "v1,AAAA"},
        )
        assert forged.status_code == 400
        job_id = (await init_service(client, admin, "svc-1", ROUTE, client_id=A)).json()["job_id"]
        await dispatch_until_idle(settings)
        async with delivering(settings):
            await eventually(lambda: f"job {job_id} succeeded" in (tmp_path / "receiver.log").read_text())
        (log,) = await deliveries(client, admin, hook["id"])
        assert log["status"] == "delivered" and log["last_status_code"] == 204
        assert "refused a delivery" in (tmp_path / "receiver.log").read_text()
    finally:
        process.terminate()
        process.wait(timeout=10)
        out.close()
