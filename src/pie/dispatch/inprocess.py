"""In-process handler implementations, registered by name (``handlers.*.value`` of type
``in_process``). Each takes the job payload (a dict) and returns the job output; raising makes
the job fail with the exception as a structured error.

Besides the built-ins below, any installed distribution can provide implementations through
Python entry points in the group ``pie.handlers`` (the entry point's name is the handler name,
its object the callable), e.g. in its ``pyproject.toml``::

    [project.entry-points."pie.handlers"]
    my_model = "my_package.handlers:predict"

They are discovered once per process, on first use (``reload_entry_points()`` looks again).

Where an implementation runs: an ``async def`` one on the dispatcher's event loop (it must not
block: await I/O); a plain function in the dispatcher's worker thread pool; the built-ins
(microseconds of pure computation, registered ``inline=True``) directly on the event loop,
where a thread hand-over would cost many times the call itself.
A built-in name cannot be taken over; an entry point that fails to load is logged and listed
with its error, and is not usable.

**Cancellation** (spec 15.4) is cooperative: while an implementation runs, ``current_job()``
(in the thread PIE called it in) returns its :class:`JobContext`, whose ``cancelled()`` turns
true once the job is cancelled; ``cancelled()`` is the shortcut. A long handler checks it
between steps and returns (or raises) early; whatever it returns after a cancel is discarded.
A handler that starts threads of its own passes them the context (or copies its
``contextvars`` context).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

log = logging.getLogger("pie.dispatch")

Implementation = Callable[[dict[str, Any]], Any]
ENTRY_POINT_GROUP = "pie.handlers"


@dataclass(frozen=True)
class Registered:
    name: str
    source: str  # "builtin" | "entry_point" | "code" (register() called by other code)
    target: str  # "module:qualname"
    distribution: str | None = None
    implementation: Implementation | None = None
    error: str | None = None  # why an entry point could not be loaded
    # where the dispatcher runs it: "inline" (on the event loop, for instant pure functions),
    # "async" (an ``async def``: a task on the event loop) or "thread" (the worker pool)
    mode: str = "thread"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "target": self.target,
            "distribution": self.distribution,
            "usable": self.implementation is not None,
            "error": self.error,
        }


_BUILTINS: dict[str, Registered] = {}
_PLUGINS: dict[str, Registered] | None = None
_plugins_lock = threading.Lock()


def run_mode(fn: Any, inline: bool = False) -> str:
    if inspect.iscoroutinefunction(fn):
        return "async"
    return "inline" if inline else "thread"


def register(name: str, *, inline: bool = False) -> Callable[[Implementation], Implementation]:
    """Register a built-in implementation (used by this module). ``inline=True``: a pure
    function that returns within microseconds, run directly on the dispatcher's event loop."""

    def decorator(fn: Implementation) -> Implementation:
        source = "builtin" if fn.__module__.startswith("pie.") else "code"  # "code": register() elsewhere
        _BUILTINS[name] = Registered(
            name,
            source,
            f"{fn.__module__}:{fn.__qualname__}",
            "pie" if source == "builtin" else None,
            fn,
            mode=run_mode(fn, inline),
        )
        return fn

    return decorator


def _load_plugins() -> dict[str, Registered]:
    found: dict[str, Registered] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        dist = getattr(getattr(ep, "dist", None), "name", None)
        if ep.name in _BUILTINS:
            log.warning("in-process handler entry point %s (%s) ignored: %r is a built-in", ep.value, dist, ep.name)
            continue
        if ep.name in found:
            log.warning(
                "in-process handler entry point %s (%s) ignored: %r is already provided by %s",
                ep.value,
                dist,
                ep.name,
                found[ep.name].target,
            )
            continue
        try:
            fn = ep.load()
            if not callable(fn):
                raise TypeError(f"{ep.value} is not callable")
        except Exception as exc:  # a broken plugin must not take the registry down
            log.error("in-process handler entry point %r (%s) cannot be loaded: %s", ep.name, ep.value, exc)
            found[ep.name] = Registered(
                ep.name, "entry_point", ep.value, dist, None, f"{exc.__class__.__name__}: {exc}"
            )
            continue
        found[ep.name] = Registered(ep.name, "entry_point", ep.value, dist, fn, mode=run_mode(fn))
    return found


def _plugins() -> dict[str, Registered]:
    global _PLUGINS
    if _PLUGINS is None:
        with _plugins_lock:
            if _PLUGINS is None:
                _PLUGINS = _load_plugins()
    return _PLUGINS


def reload_entry_points() -> None:
    """Discover the ``pie.handlers`` entry points again (after installing a distribution)."""
    global _PLUGINS
    with _plugins_lock:
        _PLUGINS = _load_plugins()


def registrations() -> list[Registered]:
    """Every built-in and entry-point implementation (also unusable ones), by name."""
    merged = {**_plugins(), **_BUILTINS}
    return [merged[name] for name in sorted(merged)]


def registered_names() -> list[str]:
    """The names usable as ``in_process`` handler values."""
    return [r.name for r in registrations() if r.implementation is not None]


def get_implementation(name: str) -> Implementation | None:
    found = _BUILTINS.get(name) or _plugins().get(name)
    return found.implementation if found is not None else None


def inline_names() -> list[str]:
    """The names of the implementations that run inline (on the dispatcher's event loop): their
    jobs need no worker, so a dispatcher claims them beside its free workers' share."""
    return sorted(name for name, r in _BUILTINS.items() if r.mode == "inline" and r.implementation is not None)


def get_registered(name: str) -> Registered | None:
    """The usable registration named ``name`` (its implementation and run mode), or None."""
    found = _BUILTINS.get(name) or _plugins().get(name)
    return found if found is not None and found.implementation is not None else None


@dataclass(frozen=True)
class JobContext:
    """The job an in-process implementation is running (``current_job()``)."""

    job_id: str
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def cancelled(self) -> bool:
        """True once the job was cancelled (``POST /v2/jobs/{id}/cancel``): stop early; the
        result of a cancelled job is discarded."""
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Raise the flag (the dispatcher does, when it learns of the cancellation)."""
        self._cancel.set()


_current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar("pie_job_context", default=None)


def current_job() -> JobContext | None:
    """The context of the in-process job running in this thread (None outside a job)."""
    return _current.get()


def cancelled() -> bool:
    """True when the in-process job running in this thread was cancelled."""
    context = _current.get()
    return context is not None and context.cancelled()


def run_in_context(context: JobContext, fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn(*args)`` with ``context`` as the current job (in the calling thread)."""
    token = _current.set(context)
    try:
        return fn(*args)
    finally:
        _current.reset(token)


async def await_in_context(context: JobContext, fn: Callable[..., Any], *args: Any) -> Any:
    """Await ``fn(*args)`` (an ``async def`` implementation) with ``context`` as the current job
    (in the calling task)."""
    token = _current.set(context)
    try:
        return await fn(*args)
    finally:
        _current.reset(token)


class HandlerFailure(Exception):
    """Raised by an implementation to fail a job with a structured error."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.error = {"code": code, "message": message, **({"details": details} if details else {})}


@register("echo", inline=True)
def echo(payload: dict[str, Any]) -> dict[str, Any]:
    """Output = the payload's ``input`` and ``features``."""
    return {"input": payload.get("input"), "features": payload.get("features")}


@register("fail", inline=True)
def fail(payload: dict[str, Any]) -> Any:
    """Always fails with a structured error (for testing pipelines)."""
    raise HandlerFailure("deliberate_failure", "the 'fail' handler always fails", {"job_id": payload.get("job_id")})


def _number(value: Any, default: float, low: float, high: float) -> float:
    """A numeric feature clamped to its documented range (the default when not a finite number)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return default
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        number = float("inf") if value > 0 else float("-inf")
    if number != number:  # NaN
        return default
    return min(max(number, low), high)


@register("reference_pricing", inline=True)
def reference_pricing(payload: dict[str, Any]) -> dict[str, Any]:
    """A small deterministic price recommendation from the features (input keys override).

    price = base 100
          x (1 + 0.02 x competitor_count)            competition pushes the price up to +40%
          x (1 + 0.003 x advertising_spend)          ad spend 0..100 adds up to +30%
          x (0.85 + 0.3 x demand_index)              demand_index = mean(weekly_demand)/100, in 0..1
          x 1.1 if on_demand
    rounded to cents; values outside those ranges (competitor_count 0..20, advertising_spend
    0..100, demand_index 0..1) are clamped to them, so the price stays within 85.00..230.23.
    For training jobs the output is a parameter set describing this formula.
    """
    features = dict(payload.get("features") or {})
    inputs = payload.get("input") or {}
    if isinstance(inputs, dict):
        features.update(inputs)
    if payload.get("job_type") == "training":
        return {
            "model": "reference_pricing",
            "parameters": {"base": 100.0, "competition": 0.02, "advertising": 0.003, "on_demand": 1.1},
            "trained_on_features": sorted(features),
        }
    competitors = _number(features.get("competitor_count"), 0.0, 0.0, 20.0)
    spend = _number(features.get("advertising_spend"), 0.0, 0.0, 100.0)
    weekly = features.get("weekly_demand")
    if (
        isinstance(weekly, list)
        and weekly
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in weekly)
    ):
        # demand is never negative; huge values (even integers beyond float range) saturate
        days = [_number(v, 0.0, 0.0, math.inf) for v in weekly]
        demand_index = min(sum(days) / len(days) / 100.0, 1.0)
    else:
        demand_index = 0.5
    price = 100.0 * (1 + 0.02 * competitors) * (1 + 0.003 * spend) * (0.85 + 0.3 * demand_index)
    if features.get("on_demand") is True:
        price *= 1.1
    return {
        "recommended_price": round(price, 2),
        "currency": "AUD",
        "route": features.get("route"),
        "factors": {
            "competitor_count": competitors,
            "advertising_spend": spend,
            "demand_index": round(demand_index, 4),
            "on_demand": features.get("on_demand") is True,
        },
    }
