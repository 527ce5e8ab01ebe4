from __future__ import annotations

import uuid
from typing import Literal

from pie.schemas import Identifier, RequestBody, ResponseBody, UtcDatetime


class ClientCreate(RequestBody):
    client_id: Identifier
    name: str


class ClientUpdate(RequestBody):
    name: str | None = None
    status: Literal["active", "suspended"] | None = None


class ClientOut(ResponseBody):
    client_id: str
    client_uuid: uuid.UUID
    name: str
    status: str
    created_at: UtcDatetime
    updated_at: UtcDatetime
