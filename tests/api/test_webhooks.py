"""POST/GET/DELETE /api/webhooks and GET /api/batches/{id}/deliveries over real HTTP."""

from __future__ import annotations

from dataclasses import replace

import pytest
from structlog.testing import capture_logs

from reconciler.app import Ports, Role
from reconciler.config import Settings
from tests.api.served import assert_error, serving
from tests.delivery_support import fast, settled
from tests.helpers import submit, wait_for
from tests.receiver import Answer, receiving

ALLOWED = ("127.0.0.0/8", "hooks.example.com")
BAD_URLS = [
    ("no scheme", "hooks.example.com/x"),
    ("ftp", "ftp://hooks.example.com/x"),
    ("no host", "http:///x"),
    ("bad port", "http://hooks.example.com:99999/x"),
    ("credentials", "https://user:pw@hooks.example.com/x"),
    ("host not allowed", "https://evil.example.com/x"),
    ("address not allowed", "http://10.0.0.1/x"),
]


async def test_create_shows_the_secret_once_and_list_never(
    settings: Settings, ports: Ports
) -> None:
    """The 201 answer carries a generated whsec_ secret; the list and the logs never do."""
    with capture_logs() as logs:
        async with serving(settings, ports, Role.API) as served:
            created = await served.http.post("/api/webhooks", json={"url": "http://x.test/h"})
            listed = await served.http.get("/api/webhooks")
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["secret"].startswith("whsec_") and body["events"] == ["batch.finalized"]
    assert listed.status_code == 200
    assert [w["webhook_id"] for w in listed.json()["items"]] == [body["webhook_id"]]
    assert body["secret"] not in listed.text and "secret" not in listed.text
    assert body["secret"] not in repr(logs)


@pytest.mark.parametrize(("case", "url"), BAD_URLS, ids=[c for c, _ in BAD_URLS])
async def test_a_bad_or_unallowed_url_is_422(
    settings: Settings, ports: Ports, case: str, url: str
) -> None:
    """URLs that are not http(s) to an allowed host are refused with the reason."""
    allowed = replace(settings, webhook_allowed_hosts=ALLOWED)
    async with serving(allowed, ports, Role.API) as served:
        answer = await served.http.post("/api/webhooks", json={"url": url})
    assert_error(answer, 422)


async def test_allowed_hosts_admit_listed_names_and_cidrs(settings: Settings, ports: Ports) -> None:
    """A listed host name and an address inside a listed CIDR are accepted."""
    allowed = replace(settings, webhook_allowed_hosts=ALLOWED)
    async with serving(allowed, ports, Role.API) as served:
        for url in ("https://hooks.example.com/a", "http://127.0.0.5:8000/b"):
            answer = await served.http.post("/api/webhooks", json={"url": url})
            assert answer.status_code == 201, answer.text


async def test_a_given_secret_is_kept_and_a_malformed_one_refused(
    settings: Settings, ports: Ports
) -> None:
    """A valid whsec_ secret is used as given; anything else is a 422."""
    async with serving(settings, ports, Role.API) as served:
        good = "whsec_" + "A" * 32
        kept = await served.http.post(
            "/api/webhooks", json={"url": "http://a.test", "secret": good}
        )
        bad = await served.http.post("/api/webhooks", json={"url": "http://a.test", "secret": "x"})
        unknown = {"url": "http://a.test", "events": ["batch.created"]}
        event = await served.http.post("/api/webhooks", json=unknown)
    assert kept.status_code == 201 and kept.json()["secret"] == good
    assert "whsec_" in assert_error(bad, 422)
    assert_error(event, 422)


async def test_delete_is_204_then_404(settings: Settings, ports: Ports) -> None:
    """Deleting a webhook answers 204 and removes it; deleting it again is a 404."""
    async with serving(settings, ports, Role.API) as served:
        created = (await served.http.post("/api/webhooks", json={"url": "http://a.test"})).json()
        path = f"/api/webhooks/{created['webhook_id']}"
        first, again = await served.http.delete(path), await served.http.delete(path)
        listed = await served.http.get("/api/webhooks")
    assert first.status_code == 204 and first.content == b""
    assert_error(again, 404)
    assert listed.json()["items"] == []


async def test_mutations_need_the_bearer_token_when_set(settings: Settings, ports: Ports) -> None:
    """With RECONCILER_API_TOKEN set, creating and deleting webhooks answer 401 without it."""
    async with serving(replace(settings, api_token="t0ken"), ports, Role.API) as served:
        created = await served.http.post("/api/webhooks", json={"url": "http://a.test"})
        deleted = await served.http.delete("/api/webhooks/wh_x")
        listed = await served.http.get("/api/webhooks")
    assert_error(created, 401)
    assert_error(deleted, 401)
    assert listed.status_code == 200


async def test_deliveries_lists_every_attempt_of_the_batch(
    settings: Settings, ports: Ports
) -> None:
    """GET /api/batches/{id}/deliveries shows each attempt with its code and the final state."""
    with receiving(lambda n: Answer(500 if n == 1 else 204)) as receiver:
        async with serving(fast(settings), ports) as served:
            body = {"url": receiver.url, "secret": receiver.secret}
            webhook = (await served.http.post("/api/webhooks", json=body)).json()
            batch = await submit(ports, [])
            await wait_for(lambda: settled(settings, batch.batch_id, "delivered"), what="sent")
            answer = await served.http.get(f"/api/batches/{batch.batch_id}/deliveries")
            unknown = await served.http.get("/api/batches/nope/deliveries")
    assert answer.status_code == 200
    found = answer.json()
    rows = [
        (a["webhook_id"], a["attempt"], a["status_code"], a["delivered"]) for a in found["attempts"]
    ]
    assert rows == [(webhook["webhook_id"], 1, 500, False), (webhook["webhook_id"], 2, 204, True)]
    assert {"event_id", "error", "at", "hook"} <= set(found["attempts"][0])
    assert [d["state"] for d in found["deliveries"]] == ["delivered"]
    assert_error(unknown, 404)
