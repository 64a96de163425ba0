"""`resa serve`: the HTTP API. With no RESA_REDIS_URL it also runs a private Redis and one
local worker, so one command runs everything; both stop when the server stops.

Embedded mode keeps its Redis data in cache_dir/redis/<host>-<port>/, claimed with a lock for
the life of the service: a second `resa serve` on the same address (and cache dir) exits with
status 2 and one line naming the directory and the pid holding it, before it starts anything.

SIGTERM or SIGINT: stop accepting connections, let in-flight requests (generations,
streams) finish for up to RESA_DRAIN_TIMEOUT_S, stop the local worker (its running job
checkpoints and goes back to the queue, in parallel with the drain), then Redis.
"""

NAME, ORDER = "serve", 1
HELP = "run the HTTP API (with no RESA_REDIS_URL: plus an embedded Redis and one local worker)"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def register(p) -> None:
    p.add_argument("--host", default=None, help="interface to listen on (default RESA_HOST, 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default RESA_PORT, 8000)")
    p.add_argument("--log-level", default=None, choices=LOG_LEVELS, help="default RESA_LOG_LEVEL (info)")


class _Stop(Exception):
    """A stop signal outside uvicorn's own handling: leave through the normal exits."""


def _raise_stop(signum, frame) -> None:
    raise _Stop(signum)


def _ignore_stop(signum, frame) -> None:
    import logging

    logging.getLogger("resa.serve").warning("already stopping; waiting for the worker and Redis (bounded)")


def run(args) -> int:
    import contextlib
    import signal

    import uvicorn

    from app.logging import configure_logging
    from app.settings import get_settings

    settings = get_settings()
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    level = (args.log_level or settings.log_level).lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} must be one of {', '.join(LOG_LEVELS)}")
    if not 0 < port < 65536:
        raise ValueError(f"--port must be 1-65535, got {port}")
    configure_logging(settings.log_json, level)
    embedded = None
    if not settings.redis_url:
        from app.local.embedded import DirBusy, EmbeddedServices

        embedded = EmbeddedServices(settings.cache_dir, host, port, drain_timeout_s=settings.drain_timeout_s)
        try:
            embedded.redis.claim()  # first: a second service on this address leaves everything as it is
        except DirBusy as exc:
            import sys

            print(f"resa serve: error: {exc}", file=sys.stderr)
            return 2

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if embedded is not None:
                embedded.begin_stop()  # the worker checkpoints its job while requests drain
            super().handle_exit(sig, frame)

    # Until uvicorn takes over the signals (and after it gives them back, re-raising the one it
    # caught), a stop signal unwinds through the `with` below, which stops the worker and Redis.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_stop)
    try:
        with embedded or contextlib.nullcontext():
            try:
                get_settings.cache_clear()  # pick up the embedded RESA_REDIS_URL
                from app.main import create_app

                app = create_app(get_settings().model_copy(update={"log_level": level.upper()}))  # --log-level wins
                config = uvicorn.Config(
                    app,
                    host=host,
                    port=port,
                    log_level=level,
                    log_config=None,  # our root handler formats uvicorn's lines too
                    access_log=False,  # the request-id middleware logs every request, with its id
                    timeout_graceful_shutdown=settings.drain_timeout_s,
                )
                Server(config).run()
            except _Stop:
                pass
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, _ignore_stop)  # the bounded shutdown below runs to its end
    except _Stop:
        pass
    return 0
