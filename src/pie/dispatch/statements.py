"""The dispatcher's SQL: claims, leases, hand-offs, heartbeats, sweeps and ECS task stops (each
statement where its rule is described)."""

from __future__ import annotations

from sqlalchemy import text

from pie.auth import signing_keys

_RENEW = text(
    """
    UPDATE jobs SET lease_expires_at = now() + make_interval(secs => :lease)
    WHERE job_id = ANY(CAST(:ids AS text[])) AND status = 'started' AND locked_by = :me
      AND lease_expires_at IS NOT NULL
    """
)
# AWS handlers accepted these jobs: no lease any more, the time-out applies from now on (plus a
# warning when their callback cannot arrive, once; and the ECS task, so a cancel can stop it).
# One statement for a batch of hand-offs; it returns the jobs it marked (a job that is no longer
# this dispatcher's was cancelled meanwhile: its ECS task is stopped).
_DISPATCHED = """
    UPDATE jobs AS j SET lease_expires_at = NULL, error = NULL, updated_at = now(),
        ecs_task = CAST(b.ecs_task AS jsonb),
        warnings = CASE WHEN b.warning IS NULL OR j.warnings @> jsonb_build_array(b.warning) THEN j.warnings
                        ELSE j.warnings || jsonb_build_array(b.warning) END
    FROM unnest(CAST(%(ids)s AS text[]), CAST(%(warnings)s AS text[]), CAST(%(ecs_tasks)s AS text[]))
        AS b(job_id, warning, ecs_task)
    WHERE j.job_id = b.job_id AND j.status = 'started' AND j.locked_by = %(me)s
    RETURNING j.job_id
    """
# ECS started a task for a job that is no longer this dispatcher's (cancelled meanwhile): stop it
_ORPHAN_TASK = text(
    """
    INSERT INTO task_stops (task_arn, job_id, cluster, reason) VALUES (:task_arn, :job_id, :cluster, :reason)
    ON CONFLICT (task_arn) DO NOTHING
    """
)
# ECS tasks to stop: claim due ones with a lease (the row is due again if this dispatcher dies)
_CLAIM_STOPS = text(
    """
    UPDATE task_stops AS t SET attempts = t.attempts + 1, next_attempt_at = now() + make_interval(secs => :lease)
    FROM (SELECT task_arn FROM task_stops WHERE next_attempt_at <= now()
          ORDER BY next_attempt_at LIMIT :n FOR UPDATE SKIP LOCKED) AS due
    WHERE t.task_arn = due.task_arn
    RETURNING t.task_arn, t.job_id, t.cluster, t.reason, t.attempts
    """
)
_STOPPED = text("DELETE FROM task_stops WHERE task_arn = :task_arn")
_STOP_LATER = text(
    """
    UPDATE task_stops SET next_attempt_at = now() + make_interval(secs => :delay), last_error = CAST(:error AS jsonb)
    WHERE task_arn = :task_arn
    """
)
_STOP_WARNING = text(
    """
    UPDATE jobs SET warnings = warnings || jsonb_build_array(CAST(:warning AS text)), updated_at = now()
    WHERE job_id = :job_id
    """
)
# running jobs of this dispatcher that were cancelled (the fallback of the NOTIFY)
_CANCELLED = text("SELECT job_id FROM jobs WHERE job_id = ANY(CAST(:ids AS text[])) AND cancelled_at IS NOT NULL")
# A job waiting for another attempt is `pending` (not started, no error: spec 15.3); the failed
# attempt shows as the job's `dispatch` (dispatch_error). The requeues of the sweep below do the same.
_RETRY = text(
    """
    UPDATE jobs SET status = 'pending', locked_by = NULL, lease_expires_at = NULL, started_at = NULL,
        next_attempt_at = now() + make_interval(secs => :delay), dispatch_error = CAST(:error AS jsonb),
        error = NULL, updated_at = now()
    WHERE job_id = :job_id AND status = 'started' AND locked_by = :me
    """
)
# Claim due pending jobs: at most :local_limit with an in-process handler that needs a worker
# (the free workers of this dispatcher) and :remote_limit that need none (Lambda/ECS hand-offs,
# invalid handlers, and the :inline implementations, which run on the event loop at once) among
# the :lookahead oldest due jobs (so a long in-process backlog is not scanned on every cycle).
# SKIP LOCKED: rows another transaction holds are skipped, never waited for.
# The same statement reads the signing key (share-locked until the claim's transaction commits,
# after the tokens are signed: ``pie.callbacks``); one statement on the dispatcher's own connection.
_CLAIM_TEMPLATE = """
    WITH signing AS ({signing}), local_due AS (
        SELECT j.job_id FROM jobs AS j
        JOIN model_versions AS mv ON mv.model_id = j.model_id AND mv.version = j.model_version
        WHERE j.status = 'pending' AND j.next_attempt_at <= now() {local_window}
          AND (mv.handlers -> j.job_type ->> 'type') IS NOT DISTINCT FROM 'in_process'
          AND coalesce(mv.handlers -> j.job_type ->> 'value', '') <> ALL(%(inline)s)
        ORDER BY j.next_attempt_at
        LIMIT %(local_limit)s
        FOR UPDATE OF j SKIP LOCKED
    ), remote_due AS (
        SELECT j.job_id FROM jobs AS j
        JOIN model_versions AS mv ON mv.model_id = j.model_id AND mv.version = j.model_version
        WHERE j.status = 'pending' AND j.next_attempt_at <= now() {window}
          AND ((mv.handlers -> j.job_type ->> 'type') IS DISTINCT FROM 'in_process'
               OR coalesce(mv.handlers -> j.job_type ->> 'value', '') = ANY(%(inline)s))
        ORDER BY j.next_attempt_at
        LIMIT %(remote_limit)s
        FOR UPDATE OF j SKIP LOCKED
    ), due AS (
        SELECT job_id FROM local_due UNION ALL SELECT job_id FROM remote_due
    )
    UPDATE jobs AS j
    SET status = 'started', attempts = j.attempts + 1, started_at = now(), updated_at = now(),
        locked_by = %(me)s, lease_expires_at = now() + make_interval(secs => %(lease)s),
        timeout_seconds = CAST(mv.handlers -> j.job_type ->> 'timeout_seconds' AS double precision)
    FROM due, model_versions AS mv LEFT JOIN signing ON TRUE
    WHERE j.job_id = due.job_id AND mv.model_id = j.model_id AND mv.version = j.model_version
    RETURNING j.job_id, j.job_type, j.model_id, j.model_version, j.assignment_id, j.client_id,
              j.domain_id, j.service_id, j.input, j.features, j.domain_features, j.attempts,
              mv.handlers -> j.job_type AS handler,
              EXTRACT(EPOCH FROM now() - j.created_at) AS queued_seconds,
              pg_column_size(j.input) + coalesce(pg_column_size(j.features), 0)
                + coalesce(pg_column_size(j.domain_features), 0) AS payload_bytes,
              signing.kid AS signing_kid, signing.secret AS signing_secret
    """
# the :lookahead oldest due jobs (looked up by primary key: a bounded scan, whatever the backlog)
_WINDOW = """AND j.job_id = ANY(ARRAY(
                SELECT job_id FROM jobs WHERE status = 'pending' AND next_attempt_at <= now()
                ORDER BY next_attempt_at LIMIT %(lookahead)s))"""
# The usual claim looks for both kinds among the :lookahead oldest due jobs; the deep one (at
# most once per polling interval, when the window held too few jobs that need a worker) scans
# the whole queue for them, so none waits behind a long backlog of other kinds for long.
_CLAIM = _CLAIM_TEMPLATE.format(window=_WINDOW, local_window=_WINDOW, signing=signing_keys.SIGNING_KEY_SQL)
_CLAIM_DEEP = _CLAIM_TEMPLATE.format(window=_WINDOW, local_window="", signing=signing_keys.SIGNING_KEY_SQL)
# The claim and record connections plan their statements with index scans (a queue that was just
# bulk-loaded has no statistics yet, and a bitmap or sequential scan of the whole backlog per
# claim cost hundreds of milliseconds; their statements reach jobs by index) and without JIT
# (the cost of a scan that has no index, such as the few webhooks, then passes JIT's threshold,
# and compiling a millisecond statement took 400 ms).
_CONNECTION_SETUP = "SET enable_seqscan = off; SET enable_bitmapscan = off; SET jit = off"
# registration and heartbeat (re-registers a dispatcher whose row a peer removed as dead)
_HEARTBEAT = text(
    """
    INSERT INTO dispatchers (id, name, host, pid, workers) VALUES (:me, :name, :host, :pid, :workers)
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()
    """
)
_UNREGISTER = text("DELETE FROM dispatchers WHERE id = :me")
# dispatchers that stopped heartbeating (judged only by a dispatcher that is itself healthy)
_SILENT = text(
    """
    SELECT id FROM dispatchers
    WHERE id <> :me AND heartbeat_at < now() - make_interval(secs => :dead_after)
    """
)
_SAME_HOST = text("SELECT id, pid FROM dispatchers WHERE host = :host AND id <> :me")
# leased (in-process, or claimed and not yet handed over) jobs of dead dispatchers
_ORPHANS = text(
    """
    SELECT job_id, attempts, locked_by FROM jobs
    WHERE status = 'started' AND lease_expires_at IS NOT NULL AND locked_by <> :me
      AND (locked_by = ANY(CAST(:dead AS text[]))
           OR (:judge AND NOT EXISTS (SELECT 1 FROM dispatchers AS d WHERE d.id = jobs.locked_by)))
    ORDER BY job_id LIMIT 1000
    FOR UPDATE SKIP LOCKED
    """
)
_REQUEUE_ORPHANS = text(
    """
    UPDATE jobs AS j SET status = 'pending', locked_by = NULL, lease_expires_at = NULL, started_at = NULL,
        -- its old due time: back at the head of the queue, not behind the backlog that grew since
        next_attempt_at = LEAST(j.next_attempt_at, now()), updated_at = now(),
        dispatch_error = jsonb_build_object('code', 'dispatcher_died', 'message',
            'the dispatcher running this job stopped heartbeating; the job was queued again',
            'previous_dispatcher', j.locked_by, 'attempts', j.attempts)
    WHERE j.job_id = ANY(CAST(:ids AS text[])) AND j.status = 'started'
    """
)
_FORGET = text(
    """
    DELETE FROM dispatchers WHERE id = ANY(CAST(:ids AS text[]))
      AND (id = ANY(CAST(:gone AS text[])) OR heartbeat_at < now() - make_interval(secs => :dead_after))
    """
)
_RELEASE = text(
    """
    UPDATE jobs SET status = 'pending', locked_by = NULL, lease_expires_at = NULL, started_at = NULL,
        next_attempt_at = now(), updated_at = now()
    WHERE job_id = ANY(CAST(:ids AS text[])) AND status = 'started' AND locked_by = :me
    """
)
_TIMED_OUT = text(
    """
    SELECT job_id, attempts, started_at, coalesce(timeout_seconds, :timeout) AS timeout FROM jobs
    WHERE status = 'started' AND started_at < now() - make_interval(secs => coalesce(timeout_seconds, :timeout))
    ORDER BY started_at LIMIT 200
    FOR UPDATE SKIP LOCKED
    """
)
_REQUEUE_EXPIRED = text(
    """
    WITH expired AS (
        SELECT job_id FROM jobs
        WHERE status = 'started' AND lease_expires_at < now() AND attempts < :max_attempts
        ORDER BY lease_expires_at LIMIT 1000
        FOR UPDATE SKIP LOCKED
    )
    UPDATE jobs AS j SET status = 'pending', locked_by = NULL, lease_expires_at = NULL, started_at = NULL,
        next_attempt_at = now(), updated_at = now(),
        dispatch_error = jsonb_build_object('code', 'lease_expired', 'message',
            'the dispatcher running this job stopped renewing its lease; the job was queued again',
            'previous_dispatcher', j.locked_by, 'attempts', j.attempts)
    FROM expired WHERE j.job_id = expired.job_id
    RETURNING j.job_id
    """
)
# A claim this dispatcher gave up on (its connection timed out: a frozen server) may still run
# and commit on the server once it answers again: its jobs are then `started` and leased to us,
# but we never heard of them (they would wait for the lease, PIE_IN_PROCESS_LEASE_SECONDS).
# Until the backend of every such claim is gone, the jobs leased to us that we do not hold go
# back to the queue, not counting as an attempt.
_CLAIM_BACKENDS_ALIVE = text("SELECT pid FROM pg_stat_activity WHERE pid = ANY(CAST(:pids AS integer[]))")
_RELEASE_UNKNOWN_CLAIMS = text(
    """
    UPDATE jobs SET status = 'pending', locked_by = NULL, lease_expires_at = NULL,
        attempts = GREATEST(attempts - 1, 0), next_attempt_at = LEAST(next_attempt_at, now()), updated_at = now()
    WHERE status = 'started' AND locked_by = :me AND lease_expires_at IS NOT NULL
      AND NOT (job_id = ANY(CAST(:held AS text[])))
    RETURNING job_id
    """
)
_EXPIRED_EXHAUSTED = text(
    """
    SELECT job_id, attempts, locked_by FROM jobs
    WHERE status = 'started' AND lease_expires_at < now() AND attempts >= :max_attempts
    ORDER BY lease_expires_at LIMIT 200
    FOR UPDATE SKIP LOCKED
    """
)
