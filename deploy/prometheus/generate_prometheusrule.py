"""Generate prometheusrule.yaml (a Prometheus Operator PrometheusRule) from rules.yml.

rules.yml is the source of truth; run this after changing it:

    python deploy/prometheus/generate_prometheusrule.py          # rewrite
    python deploy/prometheus/generate_prometheusrule.py --check  # exit 1 if stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES_PATH = HERE / "rules.yml"
OUTPUT_PATH = HERE / "prometheusrule.yaml"

HEADER = """\
# GENERATED from rules.yml by generate_prometheusrule.py; do not edit by hand.
#
# Needs the Prometheus Operator CRDs. Many Prometheus installations only load
# PrometheusRules carrying a selector label such as `release: <prometheus release>`
# or `prometheus: <name>`; add it with a kustomize patch or `kubectl label`.
"""


class _BlockDumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def load_groups(path: Path = RULES_PATH) -> list[dict[str, Any]]:
    """Return the rule groups of a plain Prometheus rules file."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    groups = document["groups"]
    if not isinstance(groups, list):
        raise ValueError(f"{path}: 'groups' is not a list")
    return groups


def build_prometheusrule(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Wrap rule groups in a PrometheusRule object."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "batch-reconciler",
            "labels": {
                "app.kubernetes.io/name": "batch-reconciler",
                "app.kubernetes.io/part-of": "batch-reconciler",
            },
        },
        "spec": {"groups": groups},
    }


def render(rules_path: Path = RULES_PATH) -> str:
    """Return the text of prometheusrule.yaml for the given rules file."""
    body = yaml.dump(
        build_prometheusrule(load_groups(rules_path)),
        Dumper=_BlockDumper,
        sort_keys=False,
        width=4096,
        allow_unicode=True,
    )
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if prometheusrule.yaml is out of date"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT_PATH.read_text(encoding="utf-8") if OUTPUT_PATH.exists() else ""
        if current != text:
            print(f"{OUTPUT_PATH} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT_PATH.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
