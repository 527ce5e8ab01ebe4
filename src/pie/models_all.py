"""Import every table so the metadata is complete (Alembic, tests)."""

from pie.assignments.models import Assignment
from pie.clients.models import Client
from pie.db import Base
from pie.idempotency import IdempotencyKey
from pie.jobs.models import Job
from pie.registry.models import EventSubscription, Model, ModelVersion
from pie.tenancy.models import Domain, Service

__all__ = ["Assignment", "Base", "Client", "Domain", "EventSubscription", "IdempotencyKey", "Job", "Model", "ModelVersion", "Service"]
