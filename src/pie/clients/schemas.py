from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import StringConstraints

from pie.schemas import Identifier, RequestBody, ResponseBody, UtcDatetime

ClientName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]


class ClientCreate(RequestBody):
    client_id: Identifier
    name: ClientName


class ClientUpdate(RequestBody):
    name: ClientName | None = None
    status: Literal["active", "suspended"] | None = None


class ClientOut(ResponseBody):
    client_id: str
    client_uuid: uuid.UUID
    name: str
    status: Literal["active", "suspended"]
    created_at: UtcDatetime
    updated_at: UtcDatetime
