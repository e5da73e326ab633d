"""Output shared by the bench scripts."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any


def write_json(path: str, settings: dict[str, Any], results: list[Any]) -> None:
    """Dump a run's settings and measurements (dataclasses) as JSON."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"settings": settings, "results": [asdict(m) for m in results]}, handle, indent=2)
    print(f"\nwrote {path}")
