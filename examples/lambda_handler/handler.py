"""A PIE inference handler for AWS Lambda, built on pie_handler_kit (standard library only).

Deploy: zip this file with ``kit/pie_handler_kit.py`` (``zip fn.zip handler.py
pie_handler_kit.py``), runtime python3.12, handler ``handler.handler``; name the function's ARN
as the model's ``{"type": "lambda", "arn": ...}`` handler. The function needs no AWS credentials
for PIE and no PIE server packages: it reports with the job's own callback token.
"""

from __future__ import annotations

from pie_handler_kit import HandlerError, lambda_handler

# the output contract, checked by the kit before it reports (a mismatch fails the job)
OUTPUT_SCHEMA = {
    "type": "object",
    "required": ["recommended_price", "currency", "model"],
    "properties": {
        "recommended_price": {"type": "number", "minimum": 0},
        "currency": {"const": "AUD"},
        "model": {"type": "string"},
    },
}


def predict(input, features, job):
    """A price from the service's features; ``input`` keys override them."""
    values = {**(features or {}), **(input if isinstance(input, dict) else {})}
    if "route" not in values:
        raise HandlerError("missing_feature", "a 'route' feature or input is required", {"job_id": job.job_id})
    competitors = min(max(float(values.get("competitor_count", 0)), 0.0), 20.0)
    price = 100.0 * (1 + 0.02 * competitors) * (1.1 if values.get("on_demand") is True else 1.0)
    return {
        "recommended_price": round(price, 2),
        "currency": "AUD",
        "model": f"{job.model_id}@{job.model_version}",
        "route": values["route"],
    }


handler = lambda_handler(predict, output_schema=OUTPUT_SCHEMA)
