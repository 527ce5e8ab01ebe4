"""Integrators generate typed clients from ``/v2/openapi.json`` (README: "Typed clients"). This
generates the Python client with openapi-python-client from the document a live ``pie serve``
serves, requires the generator to run without warnings, and runs a short scenario with it:
create a client and a domain, read the domain back (typed: timestamps are datetimes, enums are
named classes)."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from conftest import scratch_pie_server

GENERATOR = shutil.which("openapi-python-client") or str(Path(sys.executable).with_name("openapi-python-client"))
if not Path(GENERATOR).exists():
    pytest.skip("openapi-python-client is not installed (pip install openapi-python-client)", allow_module_level=True)


@pytest.fixture(scope="module")
def pie_server():
    """A server of this module's own (its writes never show up in other modules' servers)."""
    with scratch_pie_server(PIE_RUN_DISPATCHER="false") as server:
        yield server


@pytest.fixture(scope="module")
def generated(pie_server, tmp_path_factory):
    """The client package generated from the served document, importable."""
    work = tmp_path_factory.mktemp("typed-client")
    document = work / "openapi.json"
    document.write_bytes(httpx.get(f"{pie_server.url}/v2/openapi.json", timeout=30).content)
    config = work / "config.json"
    # no post-generation formatter: the test checks the generator, not the formatting
    config.write_text('{"project_name_override": "pie_typed", "package_name_override": "pie_typed", "post_hooks": []}')
    result = subprocess.run(
        [
            GENERATOR,
            "generate",
            "--path",
            str(document),
            "--config",
            str(config),
            "--meta",
            "none",
            "--output-path",
            str(work / "pie_typed"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    sys.path.insert(0, str(work))
    try:
        yield importlib.import_module("pie_typed"), output
    finally:
        sys.path.remove(str(work))
        for name in [m for m in sys.modules if m == "pie_typed" or m.startswith("pie_typed.")]:
            del sys.modules[name]


def test_the_generator_is_clean(generated):
    _, output = generated
    assert "Warning" not in output and "Error" not in output, output


def test_timestamps_enums_and_handlers_are_typed(generated):
    package, _ = generated
    models = importlib.import_module("pie_typed.models")
    # timestamps are date-time, parsed into datetimes
    job = models.JobOut.from_dict(
        {
            "job_id": "j",
            "job_type": "inference",
            "status": "pending",
            "model_id": "m",
            "model_version": "1",
            "attempts": 0,
            "created_at": "2026-01-02T03:04:05Z",
            "updated_at": "2026-01-02T03:04:05Z",
            # always sent (null until a dispatch attempt fails and is retried)
            "dispatch": {
                "attempts": 1,
                "last_error": {"code": "aws_error", "message": "throttled"},
                "next_attempt_at": "2026-01-02T03:04:35Z",
            },
        }
    )
    assert isinstance(job.created_at, datetime)
    assert isinstance(job.dispatch.next_attempt_at, datetime) and job.dispatch.last_error.code == "aws_error"
    # enums are named once and shared
    assert {"AssignmentStatus", "JobStatus", "JobType", "VersionStatus", "ClientStatus"} <= set(dir(models))
    assert not [name for name in dir(models) if name.startswith("AssignmentCreateStatus")]
    # one named handler union
    assert "Handler" in (Path(models.__file__).parent / "handlers.py").read_text()


def test_scenario_create_a_client_and_a_domain_and_read_it_back(generated, pie_server):
    package, _ = generated
    models = importlib.import_module("pie_typed.models")
    clients_api = importlib.import_module("pie_typed.api.clients.createclient")
    create_domain = importlib.import_module("pie_typed.api.domains.createdomain")
    get_domain = importlib.import_module("pie_typed.api.domains.getdomain")
    admin = package.AuthenticatedClient(base_url=pie_server.url, token=pie_server.token(admin=True))
    tenant = f"typed-{uuid.uuid4().hex[:8]}"

    created = clients_api.sync_detailed(client=admin, body=models.ClientCreate(client_id=tenant, name="Typed Co"))
    assert created.status_code == 201, created.content
    assert created.parsed.client_id == tenant and created.parsed.status == models.ClientStatus.ACTIVE

    body = models.DomainCreate.from_dict({"domain_id": "harbour", "name": "Harbour", "features": []})
    made = create_domain.sync_detailed(client_id=tenant, client=admin, body=body)
    assert made.status_code == 201, made.content

    domain = get_domain.sync(client_id=tenant, domain_id="harbour", client=admin)
    assert isinstance(domain, models.DomainOut)
    assert domain.domain_id == "harbour" and domain.name == "Harbour" and isinstance(domain.created_at, datetime)

    missing = get_domain.sync_detailed(client_id=tenant, domain_id="nowhere", client=admin)
    assert missing.status_code == 404 and isinstance(missing.parsed, models.ErrorEnvelope)
