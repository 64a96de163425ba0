"""Running everything on one machine: the embedded Redis and worker of `resa serve`, and `resa demo`."""
