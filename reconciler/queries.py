"""Loads the reviewed SQL text of `queries.sql` into a name -> statement mapping."""

from __future__ import annotations

import re
from importlib.resources import files
from types import MappingProxyType
from typing import Final

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _parse(text: str) -> dict[str, str]:
    parts = _NAME.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


QUERIES: Final = MappingProxyType(
    _parse(files("reconciler").joinpath("queries.sql").read_text(encoding="utf-8"))
)
