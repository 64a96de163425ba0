"""app: the resa service (FastAPI routes, schemas, settings, auth, jobs) and the `resa` CLI."""
