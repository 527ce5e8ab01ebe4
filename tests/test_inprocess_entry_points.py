"""Pluggable in-process handlers (issue 12): implementations from installed distributions'
``pie.handlers`` entry points are listed with their source, usable by models and run jobs; a
model naming a missing implementation stays a 422."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from pie.dispatch import inprocess
from pie.dispatch.dispatcher import dispatch_until_idle

PLUGIN = textwrap.dedent(
    '''
    def surcharge(payload):
        """price = input.base x (1 + features.surcharge)"""
        base = payload["input"]["base"]
        return {"price": round(base * (1 + (payload.get("features") or {}).get("surcharge", 0.1)), 2),
                "job": payload["job_id"]}

    NOT_CALLABLE = 42
    '''
)


@pytest.fixture
def plugin_distribution(tmp_path):
    """A distribution 'pie-test-plugin' on sys.path, as pip would install it: a module and its
    ``.dist-info`` with METADATA and entry_points.txt (a working, a broken and a shadowing one)."""
    (tmp_path / "pie_test_plugin.py").write_text(PLUGIN)
    info = tmp_path / "pie_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pie-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[pie.handlers]\n"
        "test_surcharge = pie_test_plugin:surcharge\n"
        "test_broken = pie_test_plugin:NOT_CALLABLE\n"
        "echo = pie_test_plugin:surcharge\n"  # a built-in name cannot be taken over
    )
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    inprocess.reload_entry_points()
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("pie_test_plugin", None)
        importlib.invalidate_caches()
        inprocess.reload_entry_points()


def model_body(model_id: str, value: str) -> dict:
    handler = {"type": "in_process", "value": value}
    return {
        "id": model_id,
        "name": model_id,
        "description": "",
        "handlers": {"training": handler, "inference": handler},
    }


async def test_entry_point_implementation_is_listed_and_runs_a_job(client, admin, auth, plugin_distribution, settings):
    reader = auth(scopes=["read_models"])
    names = (await client.get("/v2/handlers/in-process", headers=reader)).json()
    assert "test_surcharge" in names and {"echo", "fail", "reference_pricing"} <= set(names)
    assert "test_broken" not in names  # not usable

    details = {d["name"]: d for d in (await client.get("/v2/handlers/in-process?details=true", headers=reader)).json()}
    assert details["test_surcharge"] == {
        "name": "test_surcharge",
        "source": "entry_point",
        "target": "pie_test_plugin:surcharge",
        "distribution": "pie-test-plugin",
        "usable": True,
        "error": None,
    }
    assert details["echo"]["source"] == "builtin" and details["echo"]["target"] == "pie.dispatch.inprocess:echo"
    assert details["test_broken"]["usable"] is False and "not callable" in details["test_broken"]["error"]

    r = await client.post("/v2/models", json=model_body("plug", "test_surcharge"), headers=admin)
    assert r.status_code == 201, r.text
    assert (await client.post("/v2/models/plug/new_version", json={}, headers=admin)).status_code == 201
    r = await client.post("/v2/models/plug/versions/1/inference", json={"input": {"base": 100}}, headers=admin)
    assert r.status_code == 202, r.text
    job_id = r.json()["inference_job_id"]
    await dispatch_until_idle(settings)
    job = (await client.get(f"/v2/jobs/{job_id}", headers=admin)).json()
    assert job["status"] == "success" and job["output"] == {"price": 110.0, "job": job_id}


async def test_model_naming_a_missing_or_broken_implementation_is_422(client, admin, plugin_distribution):
    for value in ("test_not_installed", "test_broken"):
        r = await client.post("/v2/models", json=model_body("nope", value), headers=admin)
        assert r.status_code == 422, r.text
        assert f"unknown in-process implementation {value!r}" in r.json()["message"]


async def test_uninstalled_distribution_is_gone(client, auth, tmp_path):
    # without the distribution on sys.path the name is not offered (and models cannot use it)
    inprocess.reload_entry_points()
    names = (await client.get("/v2/handlers/in-process", headers=auth(scopes=["read_models"]))).json()
    assert "test_surcharge" not in names
