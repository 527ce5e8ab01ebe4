"""The dispatchers table: every running dispatcher registers and heartbeats here, so any other
dispatcher can tell a live one from a dead one (and requeue the dead one's jobs in seconds)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column

from pie.db import Base


class DispatcherRow(Base):
    __tablename__ = "dispatchers"

    # the dispatcher's worker id (``jobs.locked_by`` of the jobs it claimed)
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    # in-process worker threads (capacity), for operators
    workers: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(server_default=func.now())
    heartbeat_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)
