"""HTTP plumbing every route shares: strict JSON, errors, body limits, the telemetry fast path, dependencies."""
