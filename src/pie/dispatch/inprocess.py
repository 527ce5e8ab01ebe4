"""In-process handler implementations, registered by name (``handlers.*.value`` of type
``in_process``). Each takes the job payload (a dict) and returns the job output; raising makes
the job fail with the exception as a structured error."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Implementation = Callable[[dict[str, Any]], Any]

_REGISTRY: dict[str, Implementation] = {}


def register(name: str) -> Callable[[Implementation], Implementation]:
    def decorator(fn: Implementation) -> Implementation:
        _REGISTRY[name] = fn
        return fn

    return decorator


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def get_implementation(name: str) -> Implementation | None:
    return _REGISTRY.get(name)


class HandlerFailure(Exception):
    """Raised by an implementation to fail a job with a structured error."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.error = {"code": code, "message": message, **({"details": details} if details else {})}


@register("echo")
def echo(payload: dict[str, Any]) -> dict[str, Any]:
    """Output = the payload's ``input`` and ``features``."""
    return {"input": payload.get("input"), "features": payload.get("features")}


@register("fail")
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


@register("reference_pricing")
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
    if isinstance(weekly, list) and weekly and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in weekly):
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
