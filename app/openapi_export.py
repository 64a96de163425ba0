"""Write the OpenAPI document of the API to openapi/openapi.json (`python -m app.openapi_export`).

The document does not depend on the environment: it is built from default settings.
A test fails when the committed file is out of date.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"


def openapi_document() -> dict:
    from app.main import create_app
    from app.settings import Settings

    settings = Settings.model_construct(**{name: field.default for name, field in Settings.model_fields.items()})
    return create_app(settings, load_default_model=False, supervise=False).openapi()


def render() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    out = Path(argv[0]) if argv else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
