"""The operator commands of the CLI: cancel, retry-failed, audit and dead-letters.

They call the same domain operations as the HTTP API, straight against Postgres and
Redis; the audit names `--actor`, by default `cli:<login name>`.
"""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from reconciler import batches, dead_letters, operations
from reconciler.app import open_ports
from reconciler.config import Settings
from reconciler.database import Database
from reconciler.views import print_audit, print_dead_letters, print_progress

EXIT_OK = 0


def add_commands(sub: Any) -> None:
    """Adds the operator subcommands to the `reconciler` parser."""
    cancel = sub.add_parser("cancel", help="finalize a batch now; its unfinished files fail")
    retry = sub.add_parser("retry-failed", help="a new batch of a finalized batch's failed files")
    retry.add_argument("--batch-id", dest="new_batch_id", help="the new batch's id (idempotent)")
    for cmd in (cancel, retry):
        cmd.add_argument("batch_id")
        cmd.add_argument("--reason", required=True, help="why: kept in the batch's audit")
        cmd.add_argument("--actor", default=None, help="who acts (default cli:<login name>)")
        cmd.add_argument("--json", action="store_true")
    audit = sub.add_parser("audit", help="the operator actions on a batch")
    audit.add_argument("batch_id")
    audit.add_argument("--json", action="store_true")
    dead = sub.add_parser("dead-letters", help="dead-lettered jobs with their reasons")
    dead.add_argument("--limit", type=int, default=dead_letters.PAGE_SIZE)
    dead.add_argument("--after", help="the last entry id of the previous page")
    dead.add_argument("--json", action="store_true")


def _actor(args: argparse.Namespace) -> str:
    return str(args.actor or f"cli:{_login()}")


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


async def cancel(args: argparse.Namespace, settings: Settings) -> int:
    async with open_ports(settings) as ports:
        await operations.cancel(ports.db, args.batch_id, args.reason, _actor(args))
        print_progress(await _progress(ports.db, args.batch_id), as_json=args.json)
    return EXIT_OK


async def retry_failed(args: argparse.Namespace, settings: Settings) -> int:
    async with open_ports(settings) as ports:
        retried = await operations.retry_failed(
            ports.db, ports.queue, args.batch_id, args.reason, _actor(args), args.new_batch_id
        )
        progress = await _progress(ports.db, retried.batch_id)
    if not args.json:
        verb = "created" if retried.created else "already existed"
        print(f"batch {retried.batch_id} {verb} with {retried.total_files} failed files")
    print_progress(progress, as_json=args.json)
    return EXIT_OK


async def audit(args: argparse.Namespace, settings: Settings) -> int:
    async with open_ports(settings) as ports:
        items = await operations.audit(ports.db, args.batch_id)
    print_audit(args.batch_id, items, as_json=args.json)
    return EXIT_OK


async def list_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    limit = max(1, min(args.limit, dead_letters.MAX_PAGE_SIZE))
    async with open_ports(settings) as ports:
        page = await dead_letters.listed(ports.queue, limit, args.after)
    print_dead_letters(page, as_json=args.json)
    return EXIT_OK


async def _progress(db: Database, batch_id: str) -> dict[str, Any]:
    return await batches.progress(db, batch_id)
