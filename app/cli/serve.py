"""`resa serve`: the HTTP API. With no RESA_REDIS_URL it also runs a private Redis and one
local worker, so one command runs everything; both stop when the server stops."""

NAME, ORDER = "serve", 1
HELP = "run the HTTP API (with no RESA_REDIS_URL: plus an embedded Redis and one local worker)"


def register(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


class _Stop(Exception):
    """SIGTERM: leave uvicorn and the embedded services through their normal exits."""


def _raise_stop(signum, frame) -> None:
    raise _Stop(signum)


def run(args) -> int:
    import contextlib
    import logging
    import signal

    import uvicorn

    from app.settings import get_settings

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1-65535, got {args.port}")
    settings = get_settings()
    embedded = contextlib.nullcontext()
    if not settings.redis_url:
        from app.embedded import EmbeddedServices

        embedded = EmbeddedServices(settings.cache_dir)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it; ours turns that into an
    # exception so the embedded worker and Redis are stopped before the process exits.
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with embedded:
            get_settings.cache_clear()  # pick up the embedded RESA_REDIS_URL
            from app.main import create_app

            app = create_app(get_settings())
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None)
    except _Stop:
        pass
    return 0
