"""The reviewed SQL text: every statement parameterized, every name unique."""

from __future__ import annotations

import re
from pathlib import Path

from reconciler.batches import FileSpec, files_digest
from reconciler.queries import QUERIES, _parse

SOURCE = Path(__file__).parents[2] / "reconciler" / "queries.sql"


def test_every_block_is_loaded_once() -> None:
    """Each `-- name:` block becomes exactly one query."""
    names = re.findall(r"^-- name: (\w+)", SOURCE.read_text(), re.MULTILINE)
    assert len(names) == len(set(names)) == len(QUERIES)


def test_parse_splits_on_name_lines() -> None:
    """The loader keeps each statement's text under its name."""
    assert _parse("-- name: a\nSELECT 1;\n-- name: b\nSELECT $1;\n") == {
        "a": "SELECT 1;",
        "b": "SELECT $1;",
    }


def test_no_statement_formats_values_into_text() -> None:
    """Values travel as $n parameters, never as Python formatting."""
    for name, sql in QUERIES.items():
        assert "%s" not in sql and "{" not in sql.replace("'{}'", ""), name


def test_files_digest_ignores_order_but_not_content() -> None:
    """Resubmitting the same files in another order is the same batch."""
    a, b = FileSpec("1", "/a"), FileSpec("2", "/b")
    assert files_digest([a, b]) == files_digest([b, a])
    assert files_digest([a, b]) != files_digest([a, FileSpec("2", "/c")])


def test_array_codecs_names_every_array_type_bound() -> None:
    """Every array type a statement casts to, but text[], is learnt up front by
    `array_codecs` (behind a transaction pooler that lookup must run in a transaction)."""
    cast = re.compile(r"::\s*([a-z][a-z ]*?)\s*\[\]")
    used = {t for sql in QUERIES.values() for t in cast.findall(sql)} - {"text"}
    assert used, "the pattern finds the casts"
    assert set(cast.findall(QUERIES["array_codecs"])) == used
