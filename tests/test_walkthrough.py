"""The end-to-end walkthrough (spec 13) exactly as docs/walkthrough.md shows it: every ``bash``
block between the page's walkthrough markers runs, in order, in one shell, against a real ``pie serve`` on the embedded
database (zero-setup mode: no PIE_JWT_SECRET, `pie token` and the server share PIE_DATA_DIR's
development secret) with the dispatcher running the in-process ``reference_pricing`` handler.
Each block's last JSON output must contain the ``json`` block that follows it on the page."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from conftest import clean_subprocess_env, start_pie_server

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "walkthrough.md"
START, END = "<!-- walkthrough:start -->", "<!-- walkthrough:end -->"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
MARKER = "@@walkthrough-block-{}@@"


def page_blocks() -> list[tuple[str, str | None]]:
    """(bash block, the json block after it or None), in page order."""
    blocks: list[tuple[str, str | None]] = []
    text = PAGE.read_text()
    assert START in text and END in text, "walkthrough markers missing from docs/walkthrough.md"
    section = text[text.index(START) : text.index(END)]
    for match in FENCE.finditer(section):
        language, body = match.group(1), match.group(2)
        if language == "bash":
            blocks.append((body, None))
        elif language == "json":
            assert blocks and blocks[-1][1] is None, "a json block must follow a bash block"
            blocks[-1] = (blocks[-1][0], body)
    return blocks


def contains(actual: Any, expected: Any, path: str = "$") -> list[str]:
    """Differences where ``actual`` does not contain ``expected`` (dicts: a subset of keys,
    recursively; lists: same length, element by element; scalars: equal)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected an object, got {actual!r}"]
        problems = []
        for key, value in expected.items():
            if key not in actual:
                problems.append(f"{path}.{key}: missing")
            else:
                problems += contains(actual[key], value, f"{path}.{key}")
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: expected {len(expected)} items, got {actual!r}"]
        return [p for i, (a, e) in enumerate(zip(actual, expected)) for p in contains(a, e, f"{path}[{i}]")]
    return [] if actual == expected else [f"{path}: expected {expected!r}, got {actual!r}"]


def last_json(output: str) -> Any:
    for line in reversed(output.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    raise AssertionError(f"no JSON in block output:\n{output}")


def test_the_page_is_well_formed():
    blocks = page_blocks()
    assert len(blocks) >= 12
    text = "\n".join(b for b, _ in blocks)
    for needle in (
        "export TOKEN=$(.venv/bin/pie token --admin)",
        "export API=http://127.0.0.1:8000",
        "export CLIENT_ID=client-1",
        "export DOMAIN_ID=pricing",
        "export SERVICE_ID=service-1",
        "/service/init",
        "/assignments/forecast/jobs",
    ):
        assert needle in text, needle
    for _, expected in blocks:
        if expected is not None:
            json.loads(expected)


@pytest.fixture(scope="module")
def walkthrough_server():
    if shutil.which("curl") is None:
        pytest.fail("the walkthrough needs curl on PATH")
    data_dir = Path(tempfile.mkdtemp(prefix="pie-walkthrough-"))
    server = start_pie_server(data_dir, env=clean_subprocess_env())
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_walkthrough_runs_as_documented(walkthrough_server):
    server = walkthrough_server
    blocks = page_blocks()
    script = ["set -euo pipefail"]
    for index, (body, _) in enumerate(blocks):
        script.append(f"echo '{MARKER.format(index)}'")
        script.append(body)
    text = "\n".join(script)
    # the only substitutions: the server's port and where the pie/python scripts live
    text = text.replace("http://127.0.0.1:8000", server.url)
    text = text.replace(".venv/bin/", f"{Path(sys.executable).parent}/")

    env = clean_subprocess_env(PIE_DATA_DIR=str(server.data_dir))
    result = subprocess.run(["bash", "-c", text], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\nserver:\n{server.log()[-3000:]}"
    )

    outputs = re.split(r"@@walkthrough-block-(\d+)@@\n", result.stdout)
    by_block = {int(outputs[i]): outputs[i + 1] for i in range(1, len(outputs), 2)}
    assert sorted(by_block) == list(range(len(blocks)))
    checked = 0
    for index, (body, expected) in enumerate(blocks):
        if expected is None:
            continue
        actual = last_json(by_block[index])
        problems = contains(actual, json.loads(expected))
        assert not problems, f"block {index}:\n{body}\nanswered {json.dumps(actual)}\n" + "\n".join(problems)
        checked += 1
    assert checked >= 11
