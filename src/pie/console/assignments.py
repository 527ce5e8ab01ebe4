"""Assignment keys: the revision history, launching a job through a key, moving a domain key (dry-run
preview, then the confirmed move)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Form, Query, Request
from pydantic import ValidationError
from starlette.responses import HTMLResponse, RedirectResponse, Response

from pie.assignments import logic as assignments
from pie.assignments.schemas import AssignmentJobRequest, AssignmentUpsert
from pie.console import forms, signin
from pie.console.common import (
    CsrfField,
    Cursor,
    KeyPath,
    Pager,
    User,
    Writer,
    audited,
    console_router,
    describe_errors,
    render,
)
from pie.console.signin import ConsoleUser
from pie.deps import ClientIdPath, DomainIdPath, ServiceIdPath, Session, tenant_scope
from pie.errors import AssignmentBlocked, BadRequest, Conflict, NotFound, PieError, Unprocessable
from pie.jsonbody import loads as json_loads_strict  # a repeated key is refused, as in API bodies
from pie.pagination import PageParams
from pie.registry import logic as registry
from pie.tenancy import logic as tenancy

router = console_router()


async def _current(session: Any, scope: Any, domain_id: str, service_id: str | None, key: str) -> Any:
    """The key's active revision, or None (a key whose revisions are all archived)."""
    try:
        return await assignments.get_active(session, scope, domain_id, service_id, key)
    except NotFound:
        return None


def _assignment_url(client_id: str, domain_id: str, service_id: str | None, key: str) -> str:
    base = f"/console/clients/{client_id}/domains/{domain_id}"
    if service_id:
        base += f"/services/{service_id}"
    return f"{base}/assignments/{key}"


async def _assignment(
    request: Request,
    user: ConsoleUser,
    session: Any,
    client_id: str,
    domain_id: str,
    service_id: str | None,
    key: str,
    cursor: str | None,
    *,
    error: str | None = None,
    form_input: str | None = None,
    status_code: int = 200,
    moved: bool = False,
) -> HTMLResponse:
    scope = await tenant_scope(session, user.principal, client_id, "read_domains")
    pager = Pager(request, cursor)
    revisions = await assignments.list_revisions(
        session, scope, domain_id, service_id, key, pager.params, pager.response
    )
    # "from which version": the revision written just before each one (the next row, newest first)
    history = []
    for index, revision in enumerate(revisions):
        before = revisions[index + 1] if index + 1 < len(revisions) else None
        history.append((revision, before))
    active = await _current(session, scope, domain_id, service_id, key)
    # the experiment of the active revision (spec 15.7): the logic of GET .../arms, and its
    # newest shadow jobs
    experiment = shadow_jobs = None
    if active is not None and (active.split or active.shadow):
        experiment = await assignments.experiment_arms(session, scope, domain_id, service_id, key)
        shadow_jobs = await assignments.recent_shadow_jobs(session, active.assignment_id)
    url = _assignment_url(client_id, domain_id, service_id, key)
    # the move action: domain-scope keys (their upsert has the freeze check and its dry run)
    can_move = service_id is None and user.principal.has("manage_domains")
    versions: list[Any] = []
    if can_move and active is not None and user.principal.has("read_models"):
        versions = await registry.list_versions(session, active.model_id, PageParams(limit=200), Response())
    return render(
        request,
        "assignment.html",
        status_code=status_code,
        client=scope.client,
        domain_id=domain_id,
        service_id=service_id,
        key=key,
        history=history,
        active=active,
        experiment=experiment,
        shadow_jobs=shadow_jobs,
        next_url=pager.next_url,
        can_launch=user.principal.has("run_inference"),
        action=f"{url}/jobs",
        error=error,
        form_input=form_input if form_input is not None else "{}",
        can_move=can_move,
        move_action=f"{url}/move/preview",
        resnapshot_action=f"{url}/resnapshot/preview",
        versions=versions,
        moved=moved,
    )


@router.get("/clients/{client_id}/domains/{domain_id}/assignments/{assignment_key}", response_class=HTMLResponse)
async def domain_assignment_page(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    assignment_key: KeyPath,
    user: User,
    session: Session,
    cursor: Cursor = None,
    moved: Annotated[str | None, Query(max_length=1, description="after a move")] = None,
):
    return await _assignment(
        request, user, session, client_id, domain_id, None, assignment_key, cursor, moved=moved == "1"
    )


@router.get(
    "/clients/{client_id}/domains/{domain_id}/services/{service_id}/assignments/{assignment_key}",
    response_class=HTMLResponse,
)
async def service_assignment_page(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    assignment_key: KeyPath,
    user: User,
    session: Session,
    cursor: Cursor = None,
):
    return await _assignment(request, user, session, client_id, domain_id, service_id, assignment_key, cursor)


async def _launch(
    request: Request,
    user: ConsoleUser,
    session: Any,
    client_id: str,
    domain_id: str,
    service_id: str | None,
    key: str,
    csrf_token: str,
    input_text: str,
) -> Response:
    """Launch an inference job through an assignment, by the logic the API route
    ``rundomainmodelassignmentjob`` / ``runservicemodelassignmentjob`` calls, audited as it."""
    signin.check_csrf(request, user, csrf_token)
    scope = await tenant_scope(session, user.principal, client_id, "run_inference")
    try:
        value = json_loads_strict(input_text or "{}")  # a repeated key is refused, as in API bodies
        body = AssignmentJobRequest.model_validate({"job_type": "inference", "input": value})
    except ValueError as exc:  # json.JSONDecodeError and pydantic's ValidationError
        message = (
            describe_errors(exc.errors()) if isinstance(exc, ValidationError) else f"input is not valid JSON: {exc}"
        )
        raise BadRequest(message) from exc
    path = {"client_id": client_id, "domain_id": domain_id, "assignment_key": key}
    if service_id is not None:
        path["service_id"] = service_id
    action = "rundomainmodelassignmentjob" if service_id is None else "runservicemodelassignmentjob"
    async with audited(request, session, user, action, path, body.model_dump(mode="json")):
        job = await assignments.run_assignment_job(session, scope, domain_id, service_id, key, body)
    return RedirectResponse(f"/console/jobs/{job.job_id}", status_code=303)


async def _launch_or_form(
    request: Request,
    user: ConsoleUser,
    session: Any,
    client_id: str,
    domain_id: str,
    service_id: str | None,
    key: str,
    csrf_token: str,
    input_text: str,
) -> Response:
    try:
        # a savepoint: a refused launch leaves nothing behind, and the form can still be rendered
        async with session.begin_nested():
            return await _launch(request, user, session, client_id, domain_id, service_id, key, csrf_token, input_text)
    except PieError as exc:
        if exc.status_code not in (400, 422):
            raise
        # the form again, with the reason and what was typed
        return await _assignment(
            request,
            user,
            session,
            client_id,
            domain_id,
            service_id,
            key,
            None,
            error=exc.message,
            form_input=input_text,
            status_code=exc.status_code,
        )


InputField = Annotated[str, Form(alias="input", max_length=1_000_000)]


@router.post("/clients/{client_id}/domains/{domain_id}/assignments/{assignment_key}/jobs")
async def launch_domain_job(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    assignment_key: KeyPath,
    user: User,
    session: Session,
    csrf_token: CsrfField = "",
    input_text: InputField = "{}",
):
    return await _launch_or_form(
        request, user, session, client_id, domain_id, None, assignment_key, csrf_token, input_text
    )


@router.post("/clients/{client_id}/domains/{domain_id}/services/{service_id}/assignments/{assignment_key}/jobs")
async def launch_service_job(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    service_id: ServiceIdPath,
    assignment_key: KeyPath,
    user: User,
    session: Session,
    csrf_token: CsrfField = "",
    input_text: InputField = "{}",
):
    return await _launch_or_form(
        request, user, session, client_id, domain_id, service_id, assignment_key, csrf_token, input_text
    )


# -- moving an assignment key: dry-run preview, then the confirmed move --------------------------------

VersionField = Annotated[str, Form(max_length=256)]
MOVE_ACTION = "putdomainmodelassignment"  # the API operation the move is (audit action)


def _move_body(model_id: str, model_version: str) -> AssignmentUpsert:
    """The body of ``PUT .../assignments/{key}`` the move sends: an active revision of that version."""
    try:
        return AssignmentUpsert.model_validate({"model_id": model_id.strip(), "model_version": model_version.strip()})
    except ValidationError as exc:
        raise BadRequest(describe_errors(exc.errors())) from exc


def _refuse_no_op(key: str, current: Any, body: AssignmentUpsert) -> None:
    """The move form moves a key to another version: to the version it already points at is
    refused (422), nothing to preview or confirm."""
    if current is not None and (current.model_id, current.model_version) == (body.model_id, body.model_version):
        again = (
            " (to take a new snapshot of the live features, use Re-snapshot default)"
            if key == tenancy.DEFAULT_KEY
            else ""
        )
        raise Unprocessable(
            f"assignment {key} already points at {body.model_id} v{body.model_version}: "
            f"choose another version to move it to{again}"
        )


def _preview(
    request: Request,
    scope: Any,
    domain_id: str,
    key: str,
    current: Any,
    body: AssignmentUpsert,
    *,
    status_code: int = 200,
    dry_run: Any = None,
    blocked: AssignmentBlocked | None = None,
    error: str | None = None,
) -> HTMLResponse:
    url = _assignment_url(scope.client_id, domain_id, None, key)
    return render(
        request,
        "move_preview.html",
        status_code=status_code,
        client=scope.client,
        domain_id=domain_id,
        key=key,
        current=current,
        target=body,
        dry_run=dry_run,
        blocked=blocked,
        error=error,
        assignment_url=url,
        confirm_action=f"{url}/move",
        expected=str(current.assignment_id) if current is not None else "",
    )


def _refused(
    request: Request, scope: Any, domain_id: str, key: str, current: Any, body: AssignmentUpsert, exc: PieError
) -> HTMLResponse:
    """The preview page of a refused move: the blocking services (422), or the reason (409: the
    key moved since the preview; 422: e.g. an unknown or failed version). Other errors propagate
    (the error page)."""
    if isinstance(exc, AssignmentBlocked):
        return _preview(request, scope, domain_id, key, current, body, status_code=422, blocked=exc)
    if exc.status_code not in (409, 422):
        raise exc
    return _preview(request, scope, domain_id, key, current, body, status_code=exc.status_code, error=exc.message)


@router.post(
    "/clients/{client_id}/domains/{domain_id}/assignments/{assignment_key}/move/preview", response_class=HTMLResponse
)
async def move_preview(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    assignment_key: KeyPath,
    user: User,
    session: Session,
    csrf_token: CsrfField = "",
    model_id: VersionField = "",
    model_version: VersionField = "",
):
    """The dry run (``PUT ...?dry_run=true``): every check of the move, nothing written; the
    answer is the page that asks to confirm (or lists the services that block it)."""
    signin.check_csrf(request, user, csrf_token)
    scope = await tenant_scope(session, user.principal, client_id, "manage_domains")
    body = _move_body(model_id, model_version)
    current = await _current(session, scope, domain_id, None, assignment_key)
    try:
        _refuse_no_op(assignment_key, current, body)
        dry_run = await assignments.upsert_domain_assignment(
            session, scope, domain_id, assignment_key, body, dry_run=True
        )
    except PieError as exc:
        return _refused(request, scope, domain_id, assignment_key, current, body, exc)
    return _preview(request, scope, domain_id, assignment_key, current, body, dry_run=dry_run)


@router.post("/clients/{client_id}/domains/{domain_id}/assignments/{assignment_key}/move", response_class=HTMLResponse)
async def move(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    assignment_key: KeyPath,
    user: User,
    session: Session,
    csrf_token: CsrfField = "",
    model_id: VersionField = "",
    model_version: VersionField = "",
    expected: Annotated[str, Form(max_length=64)] = "",
):
    """The confirmed move: the logic of ``PUT .../assignments/{key}`` (same checks, same writes),
    audited as that operation. ``expected`` is the active revision the preview showed: if the
    key moved since, nothing is written and the preview is shown again (409)."""
    signin.check_csrf(request, user, csrf_token)
    scope = await tenant_scope(session, user.principal, client_id, "manage_domains")
    body = _move_body(model_id, model_version)
    path = {"client_id": client_id, "domain_id": domain_id, "assignment_key": assignment_key}
    current = None
    try:
        async with session.begin_nested():  # a refused move leaves nothing behind
            # the row lock the upsert takes, taken first: the key cannot move between this
            # comparison with the preview and the write
            await tenancy.load_domain(session, scope.client_id, domain_id, lock="update")
            current = await _current(session, scope, domain_id, None, assignment_key)
            if expected != (str(current.assignment_id) if current is not None else ""):
                raise Conflict(f"assignment {assignment_key} changed since the preview: check the new preview")
            _refuse_no_op(assignment_key, current, body)
            async with audited(
                request,
                session,
                user,
                MOVE_ACTION,
                path,
                body.model_dump(mode="json", include={"model_id", "model_version", "status"}),
            ):
                await assignments.upsert_domain_assignment(session, scope, domain_id, assignment_key, body)
    except PieError as exc:
        return _refused(request, scope, domain_id, assignment_key, current, body, exc)
    return RedirectResponse(_assignment_url(client_id, domain_id, None, assignment_key) + "?moved=1", status_code=303)


# -- re-snapshotting default: dry-run preview, then the confirmed write -------------------------------------

DEFAULT_KEY = tenancy.DEFAULT_KEY


def _resnapshot_body(current: Any) -> AssignmentUpsert:
    """``PUT .../assignments/default`` to the version it points at, keeping the revision's role,
    settings, metadata and experiment (split and shadow): only the snapshot (and the services'
    resolution) changes."""
    return AssignmentUpsert.model_validate(
        {
            "model_id": current.model_id,
            "model_version": current.model_version,
            "role": current.role,
            "settings": current.settings,
            "metadata": current.metadata_,
            "split": current.split or [],
            "shadow": current.shadow or [],
        }
    )


async def _resnapshot_current(session: Any, scope: Any, domain_id: str) -> Any:
    current = await _current(session, scope, domain_id, None, DEFAULT_KEY)
    if current is None:
        raise Unprocessable(
            f"no model assigned: domain {domain_id} has no active default assignment, so there is nothing to "
            "re-snapshot"
        )
    return current


async def _resnapshot_page(
    request: Request,
    session: Any,
    scope: Any,
    domain_id: str,
    current: Any,
    *,
    status_code: int = 200,
    dry_run: Any = None,
    blocked: AssignmentBlocked | None = None,
    error: str | None = None,
) -> HTMLResponse:
    """The preview of a re-snapshot: the contract now and after (what the new revision would
    store: ``pie.tenancy.logic.schema_of``, the rule of every default write), the dry run's
    counts or what refuses it."""
    domain = await tenancy.load_domain(session, scope.client_id, domain_id)
    contract = await tenancy.get_contract(session, scope, domain_id)
    version = await registry.get_model_version(session, current.model_id, current.model_version)
    after = tenancy.schema_of(version, domain)
    return render(
        request,
        "resnapshot.html",
        status_code=status_code,
        client=scope.client,
        domain_id=domain_id,
        current=current,
        contract=contract,
        frozen=version.features is not None,
        changes=forms.changes_between(contract.features, after),
        dry_run=dry_run,
        blocked=blocked,
        error=error,
        assignment_url=_assignment_url(scope.client_id, domain_id, None, DEFAULT_KEY),
        action=_assignment_url(scope.client_id, domain_id, None, DEFAULT_KEY) + "/resnapshot",
        expected=str(current.assignment_id),
        features=forms.fingerprint(domain.features),
    )


@router.post(
    "/clients/{client_id}/domains/{domain_id}/assignments/default/resnapshot/preview", response_class=HTMLResponse
)
async def resnapshot_preview(
    request: Request, client_id: ClientIdPath, domain_id: DomainIdPath, user: Writer, session: Session
):
    """The dry run of writing ``default`` again to the version it points at (``PUT
    .../assignments/default?dry_run=true``): every check of the write, the freeze check of
    every service against the new snapshot included; nothing is written."""
    scope = await tenant_scope(session, user.principal, client_id, "manage_domains")
    current = await _resnapshot_current(session, scope, domain_id)
    try:
        async with session.begin_nested():  # a refused dry run leaves the session usable
            dry_run = await assignments.upsert_domain_assignment(
                session, scope, domain_id, DEFAULT_KEY, _resnapshot_body(current), dry_run=True
            )
    except AssignmentBlocked as exc:
        return await _resnapshot_page(request, session, scope, domain_id, current, status_code=422, blocked=exc)
    except PieError as exc:
        if exc.status_code not in (409, 422):
            raise
        return await _resnapshot_page(
            request, session, scope, domain_id, current, status_code=exc.status_code, error=exc.message
        )
    return await _resnapshot_page(request, session, scope, domain_id, current, dry_run=dry_run)


@router.post("/clients/{client_id}/domains/{domain_id}/assignments/default/resnapshot", response_class=HTMLResponse)
async def resnapshot(
    request: Request,
    client_id: ClientIdPath,
    domain_id: DomainIdPath,
    user: Writer,
    session: Session,
    expected: Annotated[str, Form(max_length=64)] = "",
    features: Annotated[str, Form(max_length=64)] = "",
):
    """The confirmed re-snapshot: the logic of ``PUT .../assignments/default`` (the same checks and
    writes: a new revision storing a new snapshot, every service re-resolved), audited as that
    operation. ``expected`` is the revision and ``features`` the fingerprint of the live features
    the preview showed: if either changed since, nothing is written and the preview says so (409)."""
    scope = await tenant_scope(session, user.principal, client_id, "manage_domains")
    current = await _resnapshot_current(session, scope, domain_id)
    body = _resnapshot_body(current)
    path = {"client_id": client_id, "domain_id": domain_id, "assignment_key": DEFAULT_KEY}
    try:
        async with session.begin_nested():  # a refused write leaves nothing behind
            # the row lock the upsert takes, taken first: neither the key nor the live features
            # can change between this comparison with the preview and the write
            domain = await tenancy.load_domain(session, scope.client_id, domain_id, lock="update")
            current = await _resnapshot_current(session, scope, domain_id)
            if expected != str(current.assignment_id) or features != forms.fingerprint(domain.features):
                raise Conflict("default or the live features changed since the preview: check the new preview")
            body = _resnapshot_body(current)
            async with audited(request, session, user, MOVE_ACTION, path, body.model_dump(mode="json")):
                await assignments.upsert_domain_assignment(session, scope, domain_id, DEFAULT_KEY, body)
    except AssignmentBlocked as exc:
        return await _resnapshot_page(request, session, scope, domain_id, current, status_code=422, blocked=exc)
    except PieError as exc:
        if exc.status_code not in (409, 422):
            raise
        return await _resnapshot_page(
            request, session, scope, domain_id, current, status_code=exc.status_code, error=exc.message
        )
    url = f"/console/clients/{client_id}/domains/{domain_id}?done=resnapshot#contract"
    return RedirectResponse(url, status_code=303)
