"""A PIE training task for ECS, built on pie_handler_kit (standard library only).

PIE runs the task definition with the job payload in the container environment variable
``PIE_JOB_PAYLOAD`` (a RunTask container override); ``main`` reads it, runs ``train`` and
reports the outcome with the job's callback token. Exit status: 0 reported, 1 the report could
not be delivered, 2 no usable payload.
"""

from __future__ import annotations

import statistics

from pie_handler_kit import HandlerError, main


def train(input, features, job):
    """Fit a tiny demand model: the mean and spread of ``input.weekly_demand`` (or the
    service's ``weekly_demand`` feature)."""
    params = input if isinstance(input, dict) else {}
    series = params.get("weekly_demand") or (features or {}).get("weekly_demand")
    if not isinstance(series, list) or len(series) < 2 or not all(isinstance(v, (int, float)) for v in series):
        raise HandlerError("bad_training_data", "weekly_demand must be a list of at least two numbers")
    epochs = int(params.get("epochs", 1))
    return {
        "model": f"{job.model_id}@{job.model_version}",
        "parameters": {"mean": statistics.fmean(series), "stdev": statistics.stdev(series)},
        "epochs": epochs,
        "trained_on": len(series),
    }


if __name__ == "__main__":
    raise SystemExit(main(train))
