"""The worker's HTTP API: per-user and at-risk endpoints behind the bearer token."""
