"""The event types a webhook can subscribe to (spec 15.6)."""

from __future__ import annotations

from typing import Literal

JOB_SUCCEEDED = "job.succeeded"
JOB_FAILED = "job.failed"
SERVICE_AVAILABLE = "service.available"
SERVICE_FAILED = "service.failed"
ASSIGNMENT_CHANGED = "assignment.changed"
VERSION_STATUS_CHANGED = "version.status_changed"
# sent by ``POST .../webhooks/{id}/test`` to that webhook only; not subscribable
PING = "ping"

EventType = Literal[
    "job.succeeded",
    "job.failed",
    "service.available",
    "service.failed",
    "assignment.changed",
    "version.status_changed",
]
EVENT_TYPES: tuple[str, ...] = (
    JOB_SUCCEEDED,
    JOB_FAILED,
    SERVICE_AVAILABLE,
    SERVICE_FAILED,
    ASSIGNMENT_CHANGED,
    VERSION_STATUS_CHANGED,
)
# events about the shared model registry: platform webhooks only
PLATFORM_ONLY: frozenset[str] = frozenset({VERSION_STATUS_CHANGED})
# job data leaves ``output`` out above this many bytes of JSON (spec 15.6)
MAX_OUTPUT_BYTES = 64 * 1024
# response bodies kept per delivery (the rest is dropped unread)
MAX_RESPONSE_BYTES = 1024
