"""What a handler's result becomes: storable output and error JSON, the failure of a handler
that raised; the backoff of a retry, and which database errors are transient."""

from __future__ import annotations

import json
import math
import random
import re
from typing import Any

import psycopg

from pie.config import Settings
from pie.dispatch.inprocess import HandlerFailure
from pie.jobs.logic import Completion
from pie.schemas import unstorable_json

# characters PostgreSQL text/jsonb cannot hold
_UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")


def _encoded_output(output: Any) -> str:
    """The handler's output as the JSON text to store: it must be JSON that PostgreSQL can store
    (no NaN/Infinity, no NUL characters or unpaired surrogates). Encoded once; only a text that
    may hold a NUL or a surrogate (its ASCII escapes) is looked at closer."""
    try:
        encoded = json.dumps(output, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise HandlerFailure("invalid_output", f"the handler returned output that is not JSON: {exc}") from exc
    if "\\u0000" in encoded or "\\ud" in encoded:
        problem = unstorable_json(json.loads(encoded))
        if problem is not None:
            raise HandlerFailure("invalid_output", f"the handler returned output that cannot be stored: {problem}")
    return encoded


def _failure(job_id: str, exc: BaseException) -> Completion:
    if isinstance(exc, HandlerFailure):
        return Completion(job_id, "failure", error=storable_error(exc.error))
    return Completion(
        job_id,
        "failure",
        error=storable_error(
            {
                "code": "handler_exception",
                "message": str(exc) or exc.__class__.__name__,
                "exception": exc.__class__.__name__,
            }
        ),
    )


def storable_error(error: Any) -> Any:
    """A failure's error as JSON PostgreSQL can store: values that are not JSON become their
    ``repr``, non-finite numbers strings, NUL characters and unpaired surrogates U+FFFD."""

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return _UNSTORABLE_TEXT.sub("\ufffd", value)
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {clean(str(k)): clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(json.loads(json.dumps(error, default=repr)))


def backoff_delay(settings: Settings, attempts: int) -> float:
    """Exponential backoff with (equal) jitter for the next try after ``attempts`` tries."""
    ceiling = min(settings.dispatch_backoff_max, settings.dispatch_backoff_base * (2 ** max(attempts - 1, 0)))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


# SQLSTATE classes/codes worth retrying: connection failures (08), shutdown/crash (57P),
# resources (53), query_canceled (57014: statement timeout), serialization, deadlock, lock timeout
_TRANSIENT_SQLSTATES = {"57014", "40001", "40P01", "55P03"}


_TRANSIENT_SQLSTATE_CLASSES = ("08", "57P", "53")


def is_transient_db_error(exc: BaseException) -> bool:
    """True for database errors that go away by themselves: the server is down or restarting,
    the connection broke, a timeout or a transaction conflict."""
    from sqlalchemy import exc as sa_exc

    if isinstance(
        exc, (sa_exc.TimeoutError, sa_exc.InterfaceError, psycopg.OperationalError, psycopg.InterfaceError, OSError)
    ):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        state = getattr(orig, "sqlstate", None)
        if state is None:
            return isinstance(exc, sa_exc.OperationalError) or isinstance(
                orig, (psycopg.OperationalError, psycopg.InterfaceError)
            )
        return state in _TRANSIENT_SQLSTATES or state.startswith(_TRANSIENT_SQLSTATE_CLASSES)
    return False
