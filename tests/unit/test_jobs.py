"""Job encoding: round trips, and a readable reason for every malformed entry."""

from __future__ import annotations

import json

import pytest

from reconciler import jobs
from reconciler.errors import MalformedJob


def _raw(value: object) -> dict[bytes, bytes]:
    return {b"job": json.dumps(value).encode()}


def test_round_trip() -> None:
    """What encode writes, decode reads back."""
    fields = jobs.encode("b1", "f1", "/data/x", {"k": 1})
    job = jobs.decode({k.encode(): v.encode() for k, v in fields.items()})
    assert job == jobs.FileJob("b1", "f1", "/data/x", {"k": 1})


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"other": b"x"}, "no 'job' field"),
        ({b"job": b"{not json"}, "not JSON"),
        (_raw([1, 2]), "must be a JSON object"),
        (_raw({"batch_id": "b", "file_id": "f"}), "'uri' must be a non-empty string"),
        (_raw({"batch_id": 7, "file_id": "f", "uri": "u"}), "'batch_id' must be"),
        (_raw({"batch_id": "b", "file_id": "", "uri": "u"}), "'file_id' must be"),
        (_raw({"batch_id": "b", "file_id": "f", "uri": "u", "x": 1}), "unknown fields: x"),
        ({b"job": b"\xff\xfe"}, "not JSON"),
        ({b"job": b" " * (jobs.MAX_JOB_BYTES + 1)}, "more than"),
    ],
)
def test_malformed_entries_say_why(fields: dict[bytes, bytes], reason: str) -> None:
    """Each kind of garbage raises MalformedJob with the reason in its message."""
    with pytest.raises(MalformedJob, match=reason):
        jobs.decode(fields)
