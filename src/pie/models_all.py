"""Import every table so the metadata is complete (Alembic, tests)."""

from pie.assignments.models import Assignment
from pie.audit.models import AuditRecord, VersionStatusChange
from pie.callbacks import SigningKey
from pie.clients.models import Client, ClientAppClient
from pie.db import Base
from pie.dispatch.models import DispatcherRow
from pie.idempotency import IdempotencyKey
from pie.jobs.models import Job, TaskStop
from pie.registry.models import EventSubscription, Model, ModelVersion
from pie.tenancy.models import Domain, Service
from pie.webhooks.models import Webhook, WebhookDelivery, WebhookEvent

__all__ = [
    "Assignment",
    "AuditRecord",
    "Base",
    "Client",
    "ClientAppClient",
    "DispatcherRow",
    "Domain",
    "EventSubscription",
    "IdempotencyKey",
    "Job",
    "Model",
    "ModelVersion",
    "Service",
    "SigningKey",
    "TaskStop",
    "VersionStatusChange",
    "Webhook",
    "WebhookDelivery",
    "WebhookEvent",
]
