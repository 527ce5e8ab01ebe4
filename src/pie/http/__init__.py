"""HTTP plumbing: middleware, limits, body parsing, routing and the fast layer."""
