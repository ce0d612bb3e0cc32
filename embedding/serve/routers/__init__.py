"""One router per domain: `health` (liveness, readiness, metrics), `embed`, `verify`,
`galleries`."""
