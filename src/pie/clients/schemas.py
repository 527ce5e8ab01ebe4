from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from pie.schemas import NAME_MAX_LENGTH, Identifier, RequestBody, ResponseBody, UtcDatetime

ClientName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=NAME_MAX_LENGTH)]


_APP_CLIENT_IDS = (
    "Cognito app-client ids whose machine tokens (their `client_id` claim) act for this tenant; "
    "each id belongs to at most one client and is no client's `client_id` (409)"
)


class ClientCreate(RequestBody):
    client_id: Identifier
    name: ClientName
    app_client_ids: list[Identifier] = Field(default_factory=list, max_length=100, description=_APP_CLIENT_IDS)


class ClientUpdate(RequestBody):
    name: ClientName | None = None
    status: Literal["active", "suspended"] | None = None
    app_client_ids: list[Identifier] | None = Field(
        default=None, max_length=100, description=_APP_CLIENT_IDS + "; replaces the list when given ([] clears it)"
    )


class ClientOut(ResponseBody):
    client_id: str
    client_uuid: uuid.UUID
    name: str
    status: Literal["active", "suspended"]
    app_client_ids: list[str] = Field(default_factory=list, description="Cognito app clients acting for this tenant")
    created_at: UtcDatetime
    updated_at: UtcDatetime
