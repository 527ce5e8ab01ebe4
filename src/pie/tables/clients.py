"""Registry tenants (clients)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, String, func, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from pie.db import Base, Timestamps


class Client(Timestamps, Base):
    __tablename__ = "clients"

    client_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    client_uuid: Mapped[uuid.UUID] = mapped_column(unique=True, server_default=text("gen_random_uuid()"))
    name: Mapped[str]
    status: Mapped[str] = mapped_column(String(16), server_default="active")

    # the Cognito app clients whose machine tokens act for this tenant (spec 14.2); loaded only
    # where a client is answered (``pie.clients.logic``), not by every tenant route's lookup
    app_clients: Mapped[list[ClientAppClient]] = relationship(
        lazy="raise", order_by="ClientAppClient.app_client_id", passive_deletes=True
    )

    __table_args__ = (CheckConstraint("status IN ('active', 'suspended')", name="status"),)

    @property
    def app_client_ids(self) -> list[str]:
        return [a.app_client_id for a in self.app_clients]


class ClientAppClient(Base):
    """A Cognito app client whose machine tokens act for a tenant (spec 14.2). The primary key
    makes an app-client id belong to at most one client (a second claim is a 409), and is the
    index the per-request lookup of a machine token's tenant uses."""

    __tablename__ = "client_app_clients"

    app_client_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(128), ForeignKey("clients.client_id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
