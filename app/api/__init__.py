"""The HTTP API: schemas, dependencies, errors, middleware and one router per resource."""
