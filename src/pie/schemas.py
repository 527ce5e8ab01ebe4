"""Types shared by every capability's schemas."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from pydantic import BaseModel, ConfigDict, PlainSerializer, StringConstraints

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
KEY_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"

Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
AssignmentKey = Annotated[str, StringConstraints(pattern=KEY_PATTERN)]


def iso_z(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


UtcDatetime = Annotated[datetime, PlainSerializer(iso_z, return_type=str, when_used="json")]


class RequestBody(BaseModel):
    """Base of request bodies: strict types (no silent coercion of "5" into 5)."""

    model_config = ConfigDict(strict=True, extra="ignore")


class ResponseBody(BaseModel):
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)
