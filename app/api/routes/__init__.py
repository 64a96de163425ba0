"""One router per resource; each route is a thin call into the store, the job queue or generation."""
