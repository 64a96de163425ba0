"""The `resa` command line: one entry point, one module per verb under app/cli/.

Each verb module defines NAME, HELP, ORDER, `register(parser)` and `run(args) -> int`.
Bad input exits with status 2 and one line on stderr; nothing is written.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from adapters_store import StoreError


def _verbs():
    mods = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            mods.append(importlib.import_module(f"{__name__}.{info.name}"))
    return sorted(mods, key=lambda m: (m.ORDER, m.NAME))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resa", description="Skill transfer with sparse autoencoders: extract, tune, serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _verbs():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.register(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from resa_engine.progress import Cancelled

    try:
        return int(args._run(args) or 0)
    except (ValueError, StoreError, FileNotFoundError, PermissionError) as exc:
        print(f"resa {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Cancelled as exc:
        print(f"resa {args.command}: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"resa {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """A settings or validation error as one line (pydantic's own rendering spans several)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return "; ".join(str(e.get("msg", "")).removeprefix("Value error, ") for e in errors())
        except Exception:  # noqa: BLE001 - not pydantic's after all
            pass
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
