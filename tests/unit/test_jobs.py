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


@pytest.mark.parametrize(
    "payload", [None, [1e300] * 3, {"x": 1e16, "s": 'a,"b'}, "é\u2028", [[], {}]]
)
def test_job_rebuilt_from_stored_text_is_byte_identical(payload: object) -> None:
    """A job rebuilt from the payload's stored text equals the submitted one, byte for byte."""
    ids = ('b,"1', "f\u00e9", 'u"x,y')
    stored = None if payload is None else jobs.payload_text(payload)
    assert jobs.encode_text(*ids, stored) == jobs.encode(*ids, payload)
    body = {"batch_id": ids[0], "file_id": ids[1], "uri": ids[2], "payload": payload}
    assert jobs.encode(*ids, payload)["job"] == json.dumps(body, separators=(",", ":"))


def test_stored_text_is_spliced_not_reparsed() -> None:
    """Numbers keep the spelling they were stored with (no 1e+16, no 301 digits)."""
    fields = jobs.encode_text("b", "f", "u", '{"x":1e16,"y":1E300}')
    assert fields["job"].endswith(',"payload":{"x":1e16,"y":1E300}}')


@pytest.mark.parametrize(
    ("raw", "ids"),
    [
        (b'{"batch_id": "b", "file_id": "f", "extra": 1}', ("b", "f")),
        (b'{"batch_id": "b"}', None),
        (b'{"batch_id": "", "file_id": "f"}', None),
        (b"[1]", None),
        (b"{not json", None),
    ],
)
def test_identify_names_the_file_of_a_malformed_job(
    raw: bytes, ids: tuple[str, str] | None
) -> None:
    """A malformed job that names its batch and file plainly can still fail that file."""
    assert jobs.identify({b"job": raw}) == ids
