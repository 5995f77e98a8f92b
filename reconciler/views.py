"""How the CLI prints batches, summaries and explanations: rich tables, or JSON."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

_console = Console()


def _json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _pairs(title: str, values: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in values.items():
        table.add_row(key, "" if value is None else str(value))
    return table


def print_progress(progress: dict[str, Any], *, as_json: bool = False) -> None:
    if as_json:
        _json(progress)
        return
    _console.print(_pairs(f"batch {progress['batch_id']}", progress))


def print_summary(summary: dict[str, Any], *, as_json: bool = False) -> None:
    if as_json:
        _json(summary)
        return
    head = {k: v for k, v in summary.items() if k not in ("errors", "totals", "metadata")}
    head["processing_seconds"] = _timings(summary.get("processing_seconds") or {})
    _console.print(_pairs(f"run summary of {summary['batch_id']}", head))
    if summary.get("totals"):
        _console.print(_pairs("totals of the handlers' numeric results", summary["totals"]))
    if summary.get("errors"):
        errors = Table(title="errors", show_lines=False)
        errors.add_column("count", justify="right")
        errors.add_column("message")
        for item in summary["errors"]:
            errors.add_row(str(item["count"]), item["message"] or "")
        _console.print(errors)


def _timings(stats: dict[str, Any]) -> str:
    if not stats.get("count"):
        return "no file timed"
    parts = [f"{key} {stats[key] * 1000:.1f} ms" for key in ("p50", "p95", "max") if stats.get(key)]
    return f"{stats['count']} files: " + ", ".join(parts)


def print_batches(summaries: list[dict[str, Any]]) -> None:
    """One line per finalized batch: how it ended and what finalized it."""
    table = Table(title="finalized batches")
    for name in ("batch", "status", "finalized by", "succeeded", "failed"):
        table.add_column(name, no_wrap=True)
    table.add_column("most common error", overflow="ellipsis", no_wrap=True, max_width=40)
    for s in summaries:
        errors = f"{s['errors'][0]['count']}x {s['errors'][0]['message']}" if s["errors"] else ""
        table.add_row(
            s["batch_id"], s["status"], s["finalized_by"], str(s["files_succeeded"]),
            str(s["files_failed"]), errors,
        )  # fmt: skip
    _console.print(table)


def print_stuck(rows: list[dict[str, Any]], *, as_json: bool = False) -> None:
    if as_json:
        _json(rows)
        return
    table = Table(title=f"{len(rows)} stuck batch(es)")
    for name in ("batch_id", "succeeded", "failed", "total", "last file completed", "idle s"):
        table.add_column(name)
    for row in rows:
        table.add_row(
            row["batch_id"], str(row["files_succeeded"]), str(row["files_failed"]),
            str(row["total_files"]), str(row["last_file_completed_at"]),
            f"{row['seconds_since_last_file']:.1f}",
        )  # fmt: skip
    _console.print(table)


def print_explain(report: dict[str, Any], *, as_json: bool = False) -> None:
    if as_json:
        _json(report)
        return
    _console.print(f"[bold]{report['batch_id']}[/]: {report['verdict']}")
    table = Table(title="finalization conditions")
    for name in ("condition", "holds", "detail"):
        table.add_column(name)
    for cond in report["conditions"]:
        mark = "[green]yes[/]" if cond["holds"] else "[red]no[/]"
        table.add_row(cond["name"], mark, cond["detail"])
    _console.print(table)
    if report["blocking_files"]:
        files = Table(title="files blocking finalization")
        for name in ("file_id", "status", "attempts", "worker", "lease expired"):
            files.add_column(name)
        for f in report["blocking_files"]:
            files.add_row(f["file_id"], f["status"], str(f["attempts"]), str(f["worker"] or ""),
                          str(f["lease_expired"] or False))  # fmt: skip
        _console.print(files)


def print_created_webhook(created: dict[str, Any]) -> None:
    print(f"webhook {created['webhook_id']} -> {created['url']} ({', '.join(created['events'])})")
    print(f"secret: {created['secret']}")
    print("(shown only now: receivers verify signatures with it)")


def print_webhooks(items: list[dict[str, Any]], *, as_json: bool = False) -> None:
    if as_json:
        _json(items)
        return
    table = Table(title=f"{len(items)} webhook(s)")
    for name in ("webhook_id", "url", "events", "enabled", "created"):
        table.add_column(name)
    for w in items:
        enabled = "yes" if w["enabled"] else f"no (410 at {w['disabled_at']})"
        table.add_row(w["webhook_id"], w["url"], ",".join(w["events"]), enabled, w["created_at"])
    _console.print(table)


def print_deliveries(found: dict[str, Any], *, as_json: bool = False) -> None:
    if as_json:
        _json(found)
        return
    states = Table(title=f"deliveries of {found['batch_id']}")
    for name in ("event_id", "sink", "state", "attempts", "next attempt"):
        states.add_column(name)
    for d in found["deliveries"]:
        sink = d["webhook_id"] or f"hook {d['hook'] or ''}"
        states.add_row(
            d["event_id"], sink, d["state"], str(d["attempts"]), d["next_attempt_at"] or ""
        )
    _console.print(states)
    attempts = Table(title="attempts")
    for name in ("at", "sink", "attempt", "outcome", "status", "error"):
        attempts.add_column(name)
    for a in found["attempts"]:
        sink = a["webhook_id"] or "hook"
        status = "" if a["status_code"] is None else str(a["status_code"])
        attempts.add_row(a["at"], sink, str(a["attempt"]), a["outcome"], status, a["error"] or "")
    _console.print(attempts)


def print_audit(batch_id: str, items: list[dict[str, Any]], *, as_json: bool = False) -> None:
    """One line per operator action on the batch: when, what, who and why."""
    if as_json:
        _json({"batch_id": batch_id, "items": items})
        return
    table = Table(title=f"operator actions on {batch_id}")
    for column in ("at", "action", "actor", "reason", "detail"):
        table.add_column(column)
    for item in items:
        detail = json.dumps(item["detail"], sort_keys=True)
        table.add_row(item["at"], item["action"], item["actor"], item["reason"], detail)
    _console.print(table)


def print_dead_letters(page: dict[str, Any], *, as_json: bool = False) -> None:
    """One line per dead letter: when, why, which file, the start of its job."""
    if as_json:
        _json(page)
        return
    table = Table(title="dead letters")
    for column in ("id", "at", "reason", "batch", "file", "job"):
        table.add_column(column)
    for item in page["items"]:
        job = f"{item['job']} ({item['job_chars']} chars)"
        ids = (item["batch_id"] or "", item["file_id"] or "")
        table.add_row(item["id"], item["at"], item["reason"], *ids, job)
    _console.print(table)
    if page["next"]:
        print(f"more: reconciler dead-letters --after {page['next']}")
