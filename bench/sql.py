"""Loads the harness's reviewed SQL text (`bench/queries.sql`) by name."""

from __future__ import annotations

import re
from importlib.resources import files
from types import MappingProxyType
from typing import Final

_NAME: Final = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _parse(text: str) -> dict[str, str]:
    parts = _NAME.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


QUERIES: Final = MappingProxyType(
    _parse(files("bench").joinpath("queries.sql").read_text(encoding="utf-8"))
)
