"""Domains and services: a domain's page (live features, schema in force, assignments, services),
creating a domain, the live-features editor (rows of definitions; Save shows the impact preview
first), a service's page, initialising and updating a service (each after a confirmation).

Every write calls the logic function of its API route (``createdomain``, ``updatedomainfeatures``,
``initdomainservice``, ``updatedomainservice``) and is audited as that operation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Form, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from pie.assignments import logic as assignments
from pie.console import forms
from pie.console.common import (
    Confirmation,
    Confirmed,
    Cursor,
    Done,
    FormValues,
    NewForm,
    Pager,
    Problem,
    User,
    Writer,
    confirm_page,
    console_router,
    parse_body,
    refusal,
    rehearse,
    rehearse_audited,
    render,
    write,
)
from pie.console.signin import ConsoleUser
from pie.console.tenants import client_view
from pie.deps import ClientIdPath, DomainIdPath, ServiceIdPath, Session, TenantScope, tenant_scope
from pie.errors import BadRequest, Conflict, PieError, Unprocessable
from pie.http.body import loads as json_loads_strict  # a repeated key is refused, as in API bodies
from pie.jobs import logic as jobs
from pie.pagination import PageParams
from pie.policies import may_read_jobs
from pie.tables.tenancy import Domain
from pie.tenancy import logic as tenancy
from pie.tenancy.features import validate_feature_definitions
from pie.tenancy.schemas import DomainCreate, FeaturesUpdate, ServiceInit, ServiceUpdate

router = console_router()


def domain_url(client_id: str, domain_id: str) -> str:
    return f"/console/clients/{client_id}/domains/{domain_id}"


def _crumbs(client_id: str, domain_id: str, *more: tuple[str, str]) -> list[tuple[str, str]]:
    return [
        ("Clients", "/console/clients"),
        (client_id, f"/console/clients/{client_id}"),
        (domain_id, domain_url(client_id, domain_id)),
        *more,
    ]


@dataclass
class Governing:
    """The contract in force (spec 15.1), as ``GET .../contract`` (getdomaincontract) answers it:
    the schema stored on the active ``default`` revision (the version's frozen schema, or the
    snapshot of the live features taken when the revision was written); ``None`` without an
    active ``default`` (the API's 422 "no model assigned": no service can be initialised)."""

    definitions: list[Any] | None
    model_id: str | None = None
    model_version: str | None = None
    frozen: bool = False
    source: str | None = None  # model_version | domain_snapshot
    assignment_id: str | None = None

    def schema_of(self, name: str) -> Any:
        for definition in self.definitions or []:
            if isinstance(definition, dict) and definition.get("name") == name:
                return definition.get("json_schema")
        return None


async def governing_schema(session: Any, scope: TenantScope, domain: Domain) -> Governing:
    """The contract in force, from ``getdomaincontract``'s logic (``pie.tenancy.logic.get_contract``)."""
    try:
        contract = await tenancy.get_contract(session, scope, domain.domain_id)
    except Unprocessable:  # no active default: "no model assigned"
        return Governing(None)
    return Governing(
        contract.features,
        model_id=contract.assignment.model_id,
        model_version=contract.assignment.model_version,
        frozen=contract.source == "model_version",
        source=contract.source,
        assignment_id=str(contract.assignment.assignment_id),
    )


# -- a domain's page; creating a domain -------------------------------------------------------------------

DOMAIN_DONE = {
    "created": "Domain created.",
    "features": "Live features saved (the next-train draft); the contract in force is unchanged.",
    "resnapshot": "Default re-snapshotted: the contract in force is the new snapshot and every service was "
    "re-resolved against it.",
}


async def _domain(
    request: Request,
    user: ConsoleUser,
    session: Any,
    client_id: str,
    domain_id: str,
    cursor: str | None = None,
    *,
    new: str | None = None,
    done: str | None = None,
    problem: Problem | None = None,
) -> HTMLResponse:
    scope = await tenant_scope(session, user.principal, client_id, "read_domains")
    domain = await tenancy.load_domain(session, scope.client_id, domain_id)
    pager = Pager(request, cursor)
    services = await tenancy.list_services(session, scope, domain_id, None, pager.params, pager.response)
    active = await assignments.list_assignments(
        session, scope, domain_id, None, "active", PageParams(limit=1000), Response()
    )
    governing = await governing_schema(session, scope, domain)
    can_init = user.principal.has("init_services")
    new_service = can_init and (new == "service" or (problem is not None and problem.form == "new-service"))
    typed = problem.values if problem is not None else {}
    return render(
        request,
        "domain.html",
        status_code=problem.status_code if problem else 200,
        client=scope.client,
        domain=domain,
        services=services,
        assignments=active,
        governing=governing,
        draft_differs=governing.source == "domain_snapshot"
        and forms.fingerprint(governing.definitions) != forms.fingerprint(domain.features),
        next_url=pager.next_url,
        can_edit_features=user.principal.has("manage_domains"),
        can_init=can_init,
        new_service=new_service,
        init_rows=[
            {
                "name": d.get("name"),
                "schema": d.get("json_schema"),
                "mandatory": bool(d.get("mandatory")),
                "value": typed.get(f"sf_{d.get('name')}", ""),
            }
            for d in governing.definitions or []
            if isinstance(d, dict)
        ],
        typed=typed,
        done=DOMAIN_DONE.get(done or "") or SERVICE_DONE.get(done or ""),
        problem=problem,
    )


@router.get("/clients/{client_id}/domains/{domain_id}", response_class=HTMLResponse)
async def domain_page(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    user: User,
    session: Session,
    cursor: Cursor = None,
    new: NewForm = None,
    done: Done = None,
):
    return await _domain(request, user, session, client_id, domain_id, cursor, new=new, done=done)


@router.post("/clients/{client_id}/domains", response_class=HTMLResponse)
async def create_domain(request: Request, client_id: ClientIdPath, user: Writer, session: Session):
    """``createdomain``: an optional id (generated when empty) and a name; no features yet (the
    editor sets them)."""
    scope = await tenant_scope(session, user.principal, client_id, "manage_domains")
    form = await FormValues.read(request)
    sent: dict[str, Any] = {}
    if form.text("domain_id"):
        sent["domain_id"] = form.text("domain_id")
    if form.text("name"):
        sent["name"] = form.text("name")
    try:
        body = parse_body(DomainCreate, sent)
        domain_id = await write(
            request,
            session,
            user,
            "createdomain",
            {"client_id": client_id},
            sent,
            lambda: _created_domain_id(session, scope, body),
        )
    except PieError as exc:
        return await client_view(request, user, session, client_id, problem=refusal(exc, "new-domain", form))
    return RedirectResponse(f"{domain_url(client_id, domain_id)}?done=created", status_code=303)


async def _created_domain_id(session: Any, scope: TenantScope, body: DomainCreate) -> str:
    return (await tenancy.create_domain(session, scope, body)).domain_id


# -- the live-features editor --------------------------------------------------------------------------------


async def features_impact(
    session: Any, scope: TenantScope, domain_id: str, definitions: list[Any]
) -> tenancy.FeaturesDryRun:
    """The impact preview of the editor's Save: the API's dry run (``PUT .../features?dry_run=true``,
    ``pie.tenancy.logic.dry_run_features``: the same checks, the non-departed services whose
    ``provided_features`` would not resolve, how many were checked and the provided keys the
    definitions no longer define). Nothing is written."""
    return await tenancy.dry_run_features(session, scope, domain_id, definitions)


PREVIEW_ROWS = 200  # blocking entries listed on the preview page (the count says how many there are)


def _features_url(client_id: str, domain_id: str) -> str:
    return f"{domain_url(client_id, domain_id)}/features"


def _editor(
    request: Request,
    scope: TenantScope,
    domain: Domain,
    rows: list[forms.FeatureRow],
    *,
    problem: Problem | None = None,
) -> HTMLResponse:
    return render(
        request,
        "features.html",
        status_code=problem.status_code if problem else 200,
        client=scope.client,
        domain=domain,
        rows=rows,
        types=forms.ROW_TYPES,
        action=_features_url(scope.client_id, domain.domain_id),
        problem=problem,
    )


@router.get("/clients/{client_id}/domains/{domain_id}/features", response_class=HTMLResponse)
async def features_editor(
    request: Request, client_id: ClientIdPath, domain_id: DomainIdPath, user: User, session: Session
):
    """The editor: one row per live feature definition, plus an empty row to add one."""
    scope = await tenant_scope(session, user.principal, client_id, "manage_domains")
    domain = await tenancy.load_domain(session, scope.client_id, domain_id)
    return _editor(request, scope, domain, [*forms.rows_of(domain.features), forms.FeatureRow()])


@router.post("/clients/{client_id}/domains/{domain_id}/features", response_class=HTMLResponse)
async def features_edit(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    user: Writer,
    session: Session,
    op: Annotated[str, Form(max_length=16)] = "preview",
):
    """The editor's buttons: ``add`` (one more row), ``back`` (the rows of a previewed set), or
    ``preview``: the rows become definitions, checked by the API's own rules, and the preview
    page shows what changes and which services would not resolve. Nothing is written here."""
    scope = await tenant_scope(session, user.principal, client_id, "manage_domains")
    domain = await tenancy.load_domain(session, scope.client_id, domain_id)
    form = await FormValues.read(request)
    if op == "back":
        try:
            features = json_loads_strict(form.get("features") or "[]")
        except ValueError as exc:
            raise BadRequest("features: not valid JSON") from exc
        return _editor(request, scope, domain, [*forms.rows_of(features), forms.FeatureRow()])
    rows = forms.rows_from_form(form.items)
    if op == "add":
        return _editor(request, scope, domain, [*(r for r in rows if not r.remove), forms.FeatureRow()])
    if op != "preview":
        raise BadRequest("op must be add, back or preview")
    try:
        definitions = validate_feature_definitions(forms.definitions_of(rows))
        parse_body(FeaturesUpdate, {"features": definitions})  # the API's body rules (e.g. storable text)
        impact = await features_impact(session, scope, domain_id, definitions)
    except PieError as exc:
        return _editor(request, scope, domain, rows, problem=refusal(exc, "features", {}))
    governing = await governing_schema(session, scope, domain)
    return render(
        request,
        "features_preview.html",
        client=scope.client,
        domain=domain,
        changes=forms.changes_between(domain.features, definitions),
        definitions=definitions,
        features_json=json.dumps(definitions, ensure_ascii=False),
        expected=forms.fingerprint(domain.features),
        impact=impact,
        shown_limit=PREVIEW_ROWS,
        governing=governing,
        action=_features_url(client_id, domain_id),
    )


@router.post("/clients/{client_id}/domains/{domain_id}/features/save", response_class=HTMLResponse)
async def features_save(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    user: Writer,
    session: Session,
    features: Annotated[str, Form(max_length=2_000_000)] = "",
    expected: Annotated[str, Form(max_length=64)] = "",
):
    """The confirmed Save of a preview: ``updatedomainfeatures`` with exactly the previewed
    definitions. ``expected`` is the fingerprint of the live features the preview compared
    against: if they changed since (someone else saved), nothing is written (409)."""
    scope = await tenant_scope(session, user.principal, client_id, "manage_domains")
    try:
        definitions = json_loads_strict(features)
    except ValueError as exc:
        raise BadRequest("features: not valid JSON") from exc
    sent = {"features": definitions}
    body = parse_body(FeaturesUpdate, sent)

    async def save() -> None:
        # the lock replace_features takes, taken first: no save can land between this
        # comparison with the preview and the write
        domain = await tenancy.load_domain(session, scope.client_id, domain_id, lock="update")
        if forms.fingerprint(domain.features) != expected:
            raise Conflict("the live features changed since the preview: preview again")
        await tenancy.replace_features(session, scope, domain_id, body.features)

    try:
        await write(
            request, session, user, "updatedomainfeatures", {"client_id": client_id, "domain_id": domain_id}, sent, save
        )
    except PieError as exc:
        domain = await tenancy.load_domain(session, scope.client_id, domain_id)
        rows = [*forms.rows_of(definitions if isinstance(definitions, list) else []), forms.FeatureRow()]
        return _editor(request, scope, domain, rows, problem=refusal(exc, "features", {}))
    return RedirectResponse(f"{domain_url(client_id, domain_id)}?done=features#live-features", status_code=303)


# -- services ----------------------------------------------------------------------------------------------

SERVICE_DONE = {
    "initialised": "Service initialised: its init job is below.",
    "updated": "Service updated.",
    "reinitialised": "Service re-initialised: its new init job is below.",
    "deleted": "Service deleted: its unfinished jobs were cancelled; its jobs and history stay.",
}


def _departure_text(value: Any) -> str:
    return forms.local_input(value) + " UTC" if value is not None else "none"


@router.post("/clients/{client_id}/domains/{domain_id}/services", response_class=HTMLResponse)
async def init_service(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    user: Writer,
    session: Session,
    confirm: Confirmed = "",
) -> Response:
    """``initdomainservice``, after a confirmation page (shown only when the init would be
    accepted now: the logic runs in a savepoint that is rolled back)."""
    scope = await tenant_scope(session, user.principal, client_id, "init_services")
    domain = await tenancy.load_domain(session, scope.client_id, domain_id)
    governing = await governing_schema(session, scope, domain)
    form = await FormValues.read(request)
    sent: dict[str, Any] = {"service_id": form.text("service_id")}
    if form.text("departure"):
        sent["departure_datetime"] = form.text("departure")
    features: dict[str, Any] = {}
    for key, text in form.items:
        if key.startswith("sf_") and text.strip():
            name = key[3:]
            features[name] = forms.feature_value(text.strip(), governing.schema_of(name))
    sent["static_features"] = features
    try:
        body = parse_body(ServiceInit, sent)

        async def run() -> str:
            _service, job = await tenancy.init_service(session, scope, domain_id, body)
            return job.job_id

        if confirm != "yes":
            await rehearse(session, run)
            departure = _departure_text(body.departure_datetime)
            return confirm_page(
                request,
                Confirmation(
                    title=f"Initialise service {body.service_id}",
                    question=f"Initialise service {body.service_id} in domain {domain_id}? An init job runs "
                    f"through the default assignment ({governing.model_id} v{governing.model_version}) with "
                    "its resolved features.",
                    button=f"Initialise {body.service_id}",
                    action_url=f"{domain_url(client_id, domain_id)}/services",
                    cancel_url=domain_url(client_id, domain_id),
                    crumbs=_crumbs(client_id, domain_id),
                    facts=[("Service", body.service_id), ("Departure", departure)],
                    changes=[
                        (name, "—", forms.value_text(value, governing.schema_of(name)))
                        for name, value in body.static_features.items()
                    ],
                    notes=[] if body.static_features else ["No static feature given: defaults apply."],
                ),
                form,
            )
        path = {"client_id": client_id, "domain_id": domain_id}
        await write(request, session, user, "initdomainservice", path, sent, run)
    except PieError as exc:
        return await _domain(request, user, session, client_id, domain_id, problem=refusal(exc, "new-service", form))
    url = f"{domain_url(client_id, domain_id)}/services/{body.service_id}?done=initialised"
    return RedirectResponse(url, status_code=303)


async def _service(
    request: Request,
    user: ConsoleUser,
    session: Any,
    client_id: str,
    domain_id: str,
    service_id: str,
    *,
    done: str | None = None,
    problem: Problem | None = None,
) -> HTMLResponse:
    scope = await tenant_scope(session, user.principal, client_id, "read_domains")
    domain = await tenancy.load_domain(session, scope.client_id, domain_id)
    service = await tenancy.load_service(session, scope.client_id, domain_id, service_id)
    active = await assignments.list_assignments(
        session, scope, domain_id, service_id, "active", PageParams(limit=1000), Response()
    )
    recent_jobs: list[Any] = []
    if may_read_jobs(user.principal):
        recent_jobs = await jobs.list_jobs(
            session,
            user.principal,
            PageParams(limit=10),
            Response(),
            client_id=scope.client_id,
            domain_id=domain_id,
            service_id=service_id,
        )
    names = sorted(set(service.provided_features) | set(service.resolved_features))
    governing = await governing_schema(session, scope, domain)
    typed = problem.values if problem is not None and problem.form == "update-service" else None
    edit_rows = []
    defined = [str(d.get("name")) for d in governing.definitions or [] if isinstance(d, dict)]
    for name in [*defined, *(k for k in service.provided_features if k not in defined)]:
        schema = governing.schema_of(name)
        stored = service.provided_features.get(name)
        shown = forms.value_text(stored, schema) if name in service.provided_features else ""
        edit_rows.append(
            {
                "name": name,
                "schema": schema,
                "defined": name in defined,
                "value": typed.get(f"sf_{name}", shown) if typed is not None else shown,
            }
        )
    return render(
        request,
        "service.html",
        status_code=problem.status_code if problem else 200,
        client=scope.client,
        domain_id=domain_id,
        service=service,
        assignments=active,
        feature_names=names,
        jobs=recent_jobs,
        can_update=user.principal.has("init_services"),
        can_reinit=user.principal.has("init_services") and not service.departed,
        edit_rows=edit_rows,
        departure=typed.get("departure", "") if typed is not None else forms.local_input(service.departure_datetime),
        governing=governing,
        done=SERVICE_DONE.get(done or ""),
        problem=problem,
    )


@router.get("/clients/{client_id}/domains/{domain_id}/services/{service_id}", response_class=HTMLResponse)
async def service_page(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    user: User,
    session: Session,
    done: Done = None,
):
    return await _service(request, user, session, client_id, domain_id, service_id, done=done)


@router.post("/clients/{client_id}/domains/{domain_id}/services/{service_id}", response_class=HTMLResponse)
async def update_service(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    user: Writer,
    session: Session,
    confirm: Confirmed = "",
) -> Response:
    """``updatedomainservice``, after a confirmation page listing what changes: a feature whose
    value changed is sent, an emptied one is removed (``null``), the departure is replaced or
    cleared. The confirmation is shown only when the update would be accepted now."""
    scope = await tenant_scope(session, user.principal, client_id, "init_services")
    domain = await tenancy.load_domain(session, scope.client_id, domain_id)
    service = await tenancy.load_service(session, scope.client_id, domain_id, service_id)
    governing = await governing_schema(session, scope, domain)
    form = await FormValues.read(request)
    provided = dict(service.provided_features)
    current_departure = service.departure_datetime
    patch: dict[str, Any] = {}
    for key, text in form.items:
        if not key.startswith("sf_"):
            continue
        name, text = key[3:], text.strip()
        if not text:
            if name in provided:
                patch[name] = None
            continue
        value = forms.feature_value(text, governing.schema_of(name))
        if name not in provided or forms.fingerprint(provided[name]) != forms.fingerprint(value):
            patch[name] = value
    sent: dict[str, Any] = {}
    if patch:
        sent["static_features"] = patch
    departure = form.text("departure")
    if form.get("no_departure"):
        if current_departure is not None:
            sent["departure_datetime"] = None
    elif departure and not forms.same_instant(departure, current_departure):
        sent["departure_datetime"] = departure
    try:
        if not sent:
            raise BadRequest("nothing to update: change a feature value or the departure first")
        body = parse_body(ServiceUpdate, sent)

        async def run() -> list[str]:
            _service, undefined = await tenancy.update_service(session, scope, domain_id, service_id, body)
            return undefined

        if confirm != "yes":
            await rehearse(session, run)
            changes = []
            for name, value in patch.items():
                schema = governing.schema_of(name)
                now = forms.value_text(provided[name], schema) if name in provided else "—"
                changes.append((name, now, "removed" if value is None else forms.value_text(value, schema)))
            if "departure_datetime" in sent:
                changes.append(
                    ("Departure", _departure_text(current_departure), _departure_text(body.departure_datetime))
                )
            return confirm_page(
                request,
                Confirmation(
                    title=f"Update service {service_id}",
                    question=f"Update service {service_id}? Its features are re-resolved against the schema in "
                    "force; no job is started.",
                    button=f"Update {service_id}",
                    action_url=f"{domain_url(client_id, domain_id)}/services/{service_id}",
                    cancel_url=f"{domain_url(client_id, domain_id)}/services/{service_id}",
                    crumbs=_crumbs(
                        client_id,
                        domain_id,
                        (service_id, f"{domain_url(client_id, domain_id)}/services/{service_id}"),
                    ),
                    changes=changes,
                ),
                form,
            )
        path = {"client_id": client_id, "domain_id": domain_id, "service_id": service_id}
        await write(request, session, user, "updatedomainservice", path, sent, run)
    except PieError as exc:
        return await _service(
            request, user, session, client_id, domain_id, service_id, problem=refusal(exc, "update-service", form)
        )
    return RedirectResponse(f"{domain_url(client_id, domain_id)}/services/{service_id}?done=updated", status_code=303)


# -- re-initialising and deleting one service (spec 15.4) ----------------------------------------------------


def _service_url(client_id: str, domain_id: str, service_id: str) -> str:
    return f"{domain_url(client_id, domain_id)}/services/{service_id}"


@router.post("/clients/{client_id}/domains/{domain_id}/services/{service_id}/reinit", response_class=HTMLResponse)
async def reinit_service(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    user: Writer,
    session: Session,
    confirm: Confirmed = "",
) -> Response:
    """``reinitdomainservice`` (``pie.tenancy.logic.reinit_service``), after a confirmation naming
    the version the init job runs on (shown only when the re-init would be accepted now)."""
    scope = await tenant_scope(session, user.principal, client_id, "init_services")
    form = await FormValues.read(request)
    path = {"client_id": client_id, "domain_id": domain_id, "service_id": service_id}
    url = _service_url(client_id, domain_id, service_id)

    async def run() -> tuple[str, str, str]:
        _service, job = await tenancy.reinit_service(session, scope, domain_id, service_id)
        return job.job_id, job.model_id, job.model_version

    try:
        if confirm != "yes":
            _job, model_id, model_version = await rehearse(session, run)
            return confirm_page(
                request,
                Confirmation(
                    title=f"Re-initialise service {service_id}",
                    question=f"Re-initialise service {service_id}? A fresh init job runs through the default "
                    f"assignment ({model_id} v{model_version}) with the service's stored resolved features.",
                    button=f"Re-initialise {service_id}",
                    action_url=f"{url}/reinit",
                    cancel_url=url,
                    crumbs=_crumbs(client_id, domain_id, (service_id, url)),
                    changes=[("Status", "as it is", "initializing until the init job ends")],
                    notes=["Its stored features are not changed."],
                ),
                form,
            )
        await write(request, session, user, "reinitdomainservice", path, {}, run)
    except PieError as exc:
        return await _service(
            request, user, session, client_id, domain_id, service_id, problem=refusal(exc, "service-actions", form)
        )
    return RedirectResponse(f"{url}?done=reinitialised", status_code=303)


def _listed(values: Any, what: str) -> str:
    items = [str(v) for v in values or []]
    return f"{len(items)} {what}" + (f" ({', '.join(items[:10])}{', …' if len(items) > 10 else ''})" if items else "")


@router.post("/clients/{client_id}/domains/{domain_id}/services/{service_id}/delete", response_class=HTMLResponse)
async def delete_service(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    user: Writer,
    session: Session,
    confirm: Confirmed = "",
) -> Response:
    """``deletedomainservice`` (``pie.tenancy.logic.delete_service``), after a confirmation that
    says what the delete would do now: the unfinished jobs it cancels, the service assignments
    it archives and the replay subscriptions it makes stale (what the rehearsal recorded for
    the audit summary)."""
    scope = await tenant_scope(session, user.principal, client_id, "init_services")
    form = await FormValues.read(request)
    path = {"client_id": client_id, "domain_id": domain_id, "service_id": service_id}
    url = _service_url(client_id, domain_id, service_id)

    async def run() -> None:
        await tenancy.delete_service(session, scope, domain_id, service_id)

    try:
        if confirm != "yes":
            _none, summary = await rehearse_audited(request, session, user, "deletedomainservice", path, {}, run)
            return confirm_page(
                request,
                Confirmation(
                    title=f"Delete service {service_id}",
                    question=f"Delete service {service_id} of domain {domain_id}? It leaves every list, freeze "
                    "check and re-init, and its id may be initialised again.",
                    button=f"Delete {service_id}",
                    action_url=f"{url}/delete",
                    cancel_url=url,
                    crumbs=_crumbs(client_id, domain_id, (service_id, url)),
                    facts=[
                        ("Unfinished jobs cancelled", _listed(summary.get("cancelled_jobs"), "job(s)")),
                        ("Service assignments archived", _listed(summary.get("archived_assignments"), "key(s)")),
                        (
                            "Replay subscriptions made stale",
                            _listed(summary.get("stale_subscriptions"), "subscription(s)"),
                        ),
                    ],
                    notes=[
                        "Its jobs and assignment history stay (jobs keep their service id); the audit log keeps "
                        "every write."
                    ],
                    danger=True,
                ),
                form,
            )
        await write(request, session, user, "deletedomainservice", path, {}, run)
    except PieError as exc:
        return await _service(
            request, user, session, client_id, domain_id, service_id, problem=refusal(exc, "service-actions", form)
        )
    return RedirectResponse(f"{domain_url(client_id, domain_id)}?done=deleted", status_code=303)
