"""Registry tenants (clients)."""

from __future__ import annotations

import uuid

from sqlalchemy import CheckConstraint, String, text
from sqlalchemy.orm import Mapped, mapped_column

from pie.db import Base, Timestamps


class Client(Timestamps, Base):
    __tablename__ = "clients"

    client_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    client_uuid: Mapped[uuid.UUID] = mapped_column(unique=True, server_default=text("gen_random_uuid()"))
    name: Mapped[str]
    status: Mapped[str] = mapped_column(String(16), server_default="active")

    __table_args__ = (CheckConstraint("status IN ('active', 'suspended')", name="status"),)
