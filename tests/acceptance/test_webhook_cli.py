"""`reconciler webhooks add | list | remove` and `reconciler deliveries`, as real processes."""

from __future__ import annotations

import re

import anyio

from reconciler.app import Ports
from reconciler.finalization import finalize
from tests.acceptance.processes import run_cli, with_env
from tests.helpers import files, record, submit


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    done = await anyio.to_thread.run_sync(lambda: run_cli(env, *args))
    return done.returncode, done.stdout, done.stderr


async def test_webhooks_commands_show_the_secret_once(
    service_env: dict[str, str], ports: Ports
) -> None:
    """`webhooks add` prints the id and secret; `list` never shows it; `remove` deletes it."""
    env = with_env(service_env, RECONCILER_WEBHOOK_ALLOWED_HOSTS="hooks.example.com")
    url = "https://hooks.example.com/done"
    code, added, _ = await _cli(env, "webhooks", "add", url, "--event", "batch.finalized")
    assert code == 0
    webhook_id = re.search(r"webhook (wh_\w+)", added)
    secret = re.search(r"secret: (whsec_\S+)", added)
    assert webhook_id and secret
    code, listed, _ = await _cli(env, "webhooks", "list", "--json")
    assert code == 0 and webhook_id[1] in listed and secret[1] not in listed
    code, _, refused = await _cli(env, "webhooks", "add", "https://evil.example.com/")
    assert code == 2 and "not in RECONCILER_WEBHOOK_ALLOWED_HOSTS" in refused
    assert (await _cli(env, "webhooks", "remove", webhook_id[1]))[0] == 0
    assert (await _cli(env, "webhooks", "remove", webhook_id[1]))[0] == 1
    assert webhook_id[1] not in (await _cli(env, "webhooks", "list"))[1]


async def test_deliveries_command_lists_a_batch_deliveries(
    service_env: dict[str, str], ports: Ports
) -> None:
    """`reconciler deliveries BATCH_ID` shows where each delivery of its event stands."""
    assert (await _cli(service_env, "webhooks", "add", "http://127.0.0.1:9/h"))[0] == 0
    batch = await submit(ports, files(1))
    await record(ports, batch.batch_id, ["f00000"])
    await finalize(ports.db, batch.batch_id, "event")
    code, shown, _ = await _cli(service_env, "deliveries", batch.batch_id, "--json")
    assert code == 0 and '"state": "pending"' in shown and batch.batch_id in shown
    code, table, _ = await _cli(service_env, "deliveries", batch.batch_id)
    assert code == 0 and "pending" in table
    code, _, missing = await _cli(service_env, "deliveries", "no-such-batch")
    assert code == 1 and "no-such-batch" in missing
