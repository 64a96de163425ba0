"""`resa worker`: a job worker (one per GPU) pulling from the Redis queue at RESA_REDIS_URL.

SIGTERM or SIGINT: take no new job; the running one stops at its next step, saves its
checkpoint and goes back to the queue; one still running after RESA_DRAIN_TIMEOUT_S is
killed and failed with the reason; a second signal kills it at the next heartbeat.
"""

NAME, ORDER = "worker", 2
HELP = "run a job worker (one per GPU) against RESA_REDIS_URL"


def register(p) -> None:
    import argparse

    p.add_argument("--queues", default=None, help="comma-separated queue names (default: RESA_QUEUES, `resa`)")
    p.add_argument("--name", default=None, help="worker name shown in job records (default: random)")
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)


def run(args) -> int:
    import redis

    from app.jobs import run_worker
    from app.logging import configure_logging
    from app.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_json, settings.log_level)
    if not settings.redis_url:
        raise ValueError("RESA_REDIS_URL is not set; point it at the Redis that `resa serve` uses")
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    try:
        run_worker(settings, queues=queues, burst=args.burst, name=args.name, exit_with_parent=args.exit_with_parent)
    except redis.ConnectionError as exc:
        raise ValueError(f"cannot reach Redis at RESA_REDIS_URL: {exc}") from None
    return 0
