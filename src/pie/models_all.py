"""Import every table so the metadata is complete (Alembic, tests)."""

from pie.auth.signing_keys import SigningKey
from pie.db import Base
from pie.idempotency.models import IdempotencyKey
from pie.tables.assignments import Assignment
from pie.tables.audit import AuditRecord, VersionStatusChange
from pie.tables.clients import Client, ClientAppClient
from pie.tables.dispatch import DispatcherRow
from pie.tables.jobs import Job, TaskStop
from pie.tables.registry import EventSubscription, Model, ModelVersion
from pie.tables.tenancy import Domain, Service
from pie.tables.webhooks import Webhook, WebhookDelivery, WebhookEvent

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
