"""Data, not code: prompt and scenario sets, tolerances, platform export recipes."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(name: str):
    """A JSON data file of this package by name (without .json)."""
    return json.loads((HERE / f"{name}.json").read_text(encoding="utf-8"))
