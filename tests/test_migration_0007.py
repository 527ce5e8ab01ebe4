"""Migration 0007 on a database holding the old shape (issue 17): every active domain
``default`` revision gets the schema that governs it today (the version's frozen schema, else
the domain's live features), so no deployed domain changes meaning on upgrade; jobs whose
dispatch was being retried keep that in ``dispatch``, with ``error`` and ``started_at`` null."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import httpx
import psycopg
from conftest import SERVE_JWT_SECRET, clean_subprocess_env, start_pie_server

from pie.db import libpq_url
from pie.migrate import downgrade, upgrade

LIVE_A = [{"name": "route", "json_schema": {"type": "string"}, "mandatory": True}]
LIVE_B = [{"name": "zone", "json_schema": {"type": "integer"}, "mandatory": False}]
FROZEN = [{"name": "route", "json_schema": {"type": "string", "enum": ["A-B"]}, "mandatory": True}]
HANDLERS = {"training": {"type": "in_process", "value": "echo"}, "inference": {"type": "in_process", "value": "echo"}}
RETRY_ERROR = {"code": "aws_error", "message": "throttled", "attempts": 1, "retrying_in_seconds": 30}
REQUEUED = {"code": "lease_expired", "message": "the dispatcher stopped renewing its lease", "attempts": 1}
FAILED = {"code": "deliberate_failure", "message": "no"}

OLD_SHAPE = """
INSERT INTO clients (client_id, name) VALUES ('acme', 'Acme');
INSERT INTO domains (client_id, domain_id, features) VALUES
    ('acme', 'a', %(live_a)s), ('acme', 'b', %(live_b)s), ('acme', 'c', %(live_b)s), ('acme', 'idle', %(live_b)s);
INSERT INTO models (id, name, handlers, status) VALUES ('m', 'm', %(handlers)s, 'active');
INSERT INTO model_versions (model_id, version, status, handlers, features) VALUES
    ('m', '1', 'active', %(handlers)s, NULL),
    ('m', '2', 'active', %(handlers)s, %(frozen)s),
    ('m', '3', 'active', %(handlers)s, 'null'::jsonb);
INSERT INTO services (client_id, domain_id, service_id, status, provided_features, resolved_features)
    VALUES ('acme', 'a', 's1', 'available', '{"route": "x"}', '{"route": "x"}');
-- domain a: governed by its live features (version 1 has no frozen schema); an archived revision before
INSERT INTO assignments (assignment_id, client_id, domain_id, assignment_key, model_id, model_version, status)
    VALUES ('00000000-0000-0000-0000-00000000000a', 'acme', 'a', 'default', 'm', '1', 'active'),
           ('00000000-0000-0000-0000-0000000000a0', 'acme', 'a', 'default', 'm', '2', 'archived'),
           ('00000000-0000-0000-0000-0000000000af', 'acme', 'a', 'forecast', 'm', '1', 'active');
INSERT INTO assignments (assignment_id, client_id, domain_id, service_id, assignment_key, model_id, model_version)
    VALUES ('00000000-0000-0000-0000-0000000000a5', 'acme', 'a', 's1', 'default', 'm', '1');
-- domain b: version 2's frozen schema governs; domain c: a JSON null is no frozen schema
INSERT INTO assignments (assignment_id, client_id, domain_id, assignment_key, model_id, model_version)
    VALUES ('00000000-0000-0000-0000-00000000000b', 'acme', 'b', 'default', 'm', '2'),
           ('00000000-0000-0000-0000-00000000000c', 'acme', 'c', 'default', 'm', '3');
-- jobs: a dispatch being retried (the old shape: error and started_at set while pending), a
-- requeued job claimed again (started with the old error), a failure, a success
INSERT INTO jobs (job_id, job_type, model_id, model_version, status, error, attempts, started_at, next_attempt_at)
VALUES ('retrying', 'inference', 'm', '1', 'pending', %(retry)s, 1, now(), now() + interval '30 seconds'),
       ('reclaimed', 'inference', 'm', '1', 'started', %(requeued)s, 2, now(), now()),
       ('failed', 'inference', 'm', '1', 'failure', %(failed)s, 1, now(), now()),
       ('fine', 'inference', 'm', '1', 'success', NULL, 1, now(), now());
"""


def old_shape(url: str) -> None:
    params = {
        "live_a": json.dumps(LIVE_A),
        "live_b": json.dumps(LIVE_B),
        "frozen": json.dumps(FROZEN),
        "handlers": json.dumps(HANDLERS),
        "retry": json.dumps(RETRY_ERROR),
        "requeued": json.dumps(REQUEUED),
        "failed": json.dumps(FAILED),
    }
    with psycopg.connect(libpq_url(url)) as conn:
        for statement in filter(str.strip, OLD_SHAPE.split(";\n")):
            conn.execute(statement, params)


def rows(url: str, sql: str) -> dict:
    with psycopg.connect(libpq_url(url)) as conn:
        return {r[0]: r[1:] for r in conn.execute(sql)}


def test_upgrade_backfills_the_governing_schema_and_true_job_states(scratch_url):
    upgrade(scratch_url, "0006")
    old_shape(scratch_url)
    upgrade(scratch_url)

    schemas = rows(scratch_url, "SELECT assignment_id::text, governing_schema FROM assignments")
    assert schemas == {
        "00000000-0000-0000-0000-00000000000a": (LIVE_A,),
        "00000000-0000-0000-0000-00000000000b": (FROZEN,),
        "00000000-0000-0000-0000-00000000000c": (LIVE_B,),
        # not the active domain default: nothing to snapshot (the history is unknown)
        "00000000-0000-0000-0000-0000000000a0": (None,),
        "00000000-0000-0000-0000-0000000000af": (None,),
        "00000000-0000-0000-0000-0000000000a5": (None,),
    }
    jobs = rows(scratch_url, "SELECT job_id, status, error, dispatch_error, started_at IS NULL FROM jobs")
    assert jobs == {
        "retrying": ("pending", None, RETRY_ERROR, True),
        "reclaimed": ("started", None, REQUEUED, False),
        "failed": ("failure", FAILED, None, False),
        "fine": ("success", None, None, False),
    }

    # through the API: the contracts read as they governed before the upgrade
    data_dir = Path(tempfile.mkdtemp(prefix="pie-0007-"))
    server = start_pie_server(
        data_dir,
        env=clean_subprocess_env(
            PIE_DATABASE_URL=scratch_url,
            PIE_JWT_SECRET=SERVE_JWT_SECRET,
            PIE_JWT_ISSUER="pie-dev",
            PIE_RUN_DISPATCHER="false",
        ),
    )
    try:
        headers = server.admin_headers
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
            a = http.get("/v2/clients/acme/domains/a/contract").json()
            assert a == {
                "features": LIVE_A,
                "source": "domain_snapshot",
                "model_id": "m",
                "model_version": "1",
                "assignment_id": "00000000-0000-0000-0000-00000000000a",
            }
            assert http.get("/v2/clients/acme/domains/b/contract").json()["source"] == "model_version"
            assert http.get("/v2/clients/acme/domains/c/contract").json()["features"] == LIVE_B
            assert http.get("/v2/clients/acme/domains/idle/contract").status_code == 422
            job = http.get("/v2/jobs/retrying").json()
            assert job["status"] == "pending" and job["error"] is None and job["started_at"] is None
            assert job["dispatch"]["last_error"] == {"code": "aws_error", "message": "throttled"}
            assert job["dispatch"]["attempts"] == 1 and job["dispatch"]["next_attempt_at"]
    finally:
        server.stop()

    # and back: the old shape again (a retried job shows its error as before)
    downgrade(scratch_url, "0006")
    jobs = rows(scratch_url, "SELECT job_id, error FROM jobs")
    assert jobs["retrying"] == (RETRY_ERROR,) and jobs["failed"] == (FAILED,)
    with psycopg.connect(libpq_url(scratch_url)) as conn:
        columns = {r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns")}
    assert not {"governing_schema", "dispatch_error", "domain_features"} & columns
