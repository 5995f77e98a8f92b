"""Job encoding: round trips, and a readable reason for every malformed entry."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler import jobs
from reconciler.batches import FileSpec, files_digest
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


TRICKY_IDS = [
    "plain",
    'quo"te',
    "back\\slash",
    "tab\tnew\nline",
    "\x01\x1f",
    "é ü 日本",
    "😀",
    "</script>",
]


@pytest.mark.parametrize("text", TRICKY_IDS)
def test_quoted_ids_are_what_json_dumps_writes(text: str) -> None:
    """Members, job heads and digests are built from quoted parts: byte for byte what
    json.dumps gave before, so sets, rebuilt jobs and resubmission digests still match."""
    assert jobs.member(text, "f") == json.dumps([text, "f"], separators=(",", ":"))
    entry = jobs.encode(text, "f", text, {"k": [1, text]})[jobs.JOB_FIELD]
    keys = ("batch_id", "file_id", "uri", "payload")
    before = {"batch_id": text, "file_id": "f", "uri": text, "payload": {"k": [1, text]}}
    assert entry == json.dumps({k: before[k] for k in keys}, separators=(",", ":"))
    assert json.loads(entry) == before


@pytest.mark.parametrize("payload", [None, {"b": 1, "a": [2, "x"]}, "s", 1.5])
def test_files_digest_is_unchanged(payload: object) -> None:
    """The digest of a batch is the one earlier versions computed (resubmission works
    across an upgrade)."""
    specs = [FileSpec(text, f"/d/{text}", payload) for text in TRICKY_IDS]
    digest = hashlib.sha256()
    for spec in sorted(specs, key=lambda f: f.file_id):
        digest.update(json.dumps([spec.file_id, spec.uri, spec.payload], sort_keys=True).encode())
        digest.update(b"\n")
    assert files_digest(specs) == digest.hexdigest()


def _parsed(raw: bytes) -> str:
    """json.loads's value (as its repr, so NaN equals NaN), or its error."""
    try:
        return repr(json.loads(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _loaded(raw: bytes) -> str:
    try:
        return repr(jobs.loads(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"n": 123456789012345678901234567890}',  # orjson alone: a float
        b'{"n": -9223372036854775809}',
        b'{"n": 18446744073709551616}',
        b'{"n": 1e400}',  # orjson alone: refused
        b'{"n": NaN}',
        b'{"s": "\\ud800"}',
        b'{"\\ud800": 1}',
        b'\xef\xbb\xbf{"n": 1}',
        b"\xff\xfe",
        b'{"n": 1, "n": 2}',
        b'{"n": 0.1, "m": 5e-324, "k": 1.7976931348623157e308, "z": -0.0}',
        b'{"s": "\\u0000", "t": "\\ud83d\\ude00"}',
        b"{not json",
    ],
)
def test_loads_is_json_loads(raw: bytes) -> None:
    """Where orjson differs from json.loads, json.loads decides."""
    assert _loaded(raw) == _parsed(raw)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(JSON_VALUES)
def test_loads_is_json_loads_for_any_payload(payload: object) -> None:
    raw = jobs.encode("b1", "f1", "mem://x", payload)[jobs.JOB_FIELD].encode()
    assert _loaded(raw) == _parsed(raw)


def test_with_attempt_copies_only_to_change_the_attempt() -> None:
    """The first attempt is the decoded job itself; another attempt is a copy with only
    the attempt changed."""
    job = jobs.decode({b"job": b'{"batch_id":"b","file_id":"f","uri":"u","payload":{"k":1}}'})
    assert job.with_attempt(1) is job
    assert job.with_attempt(2) == jobs.FileJob("b", "f", "u", {"k": 1}, 2)
    assert job.attempt == 1
