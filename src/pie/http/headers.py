"""Request headers that decide how a request is handled, by name: the fast layer (``pie.http.fast``)
sends a request carrying one to its route, and ``pie.idempotency`` implements it."""

IDEMPOTENCY_KEY = "Idempotency-Key"
