"""Property-based requests generated from /openapi.json: no 5xx, answers as documented."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from reconciler.app import Ports, Role
from reconciler.config import Settings
from tests.api.served import serving

pytest.importorskip("schemathesis", reason="schemathesis (with hypothesis) is not installed")

import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis import checks as st_checks
from schemathesis.core.result import Err

EXAMPLES_PER_OPERATION = 50
CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
    st_checks.negative_data_rejection,
]


def _fuzz(base_url: str) -> list[str]:
    """Runs every operation in both generation modes; returns the failures found."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            failures.append(f"invalid operation in /openapi.json: {result.err()}")
            continue
        operation = result.ok()
        if _streams(operation):
            continue  # endless by design: tests/api/test_streams.py covers them
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _examples(operation, mode, base_url)()
            except Unsatisfiable:
                pass  # nothing to negate (no parameters), or no negation fits in a URL
            except (Exception, BaseExceptionGroup) as exc:  # one report per operation and mode
                failures.append(f"{operation.label} [{mode.value}]: {exc}")
    return failures


def _streams(operation: Any) -> bool:
    """Whether the operation answers an event stream, which a generated call never ends."""
    content = operation.definition.raw.get("responses", {}).get("200", {}).get("content", {})
    return "text/event-stream" in content


def _examples(operation: Any, mode: GenerationMode, base_url: str) -> Any:
    @hypothesis_settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=base_url)
        case.validate_response(response, checks=CHECKS)

    return run


async def test_generated_requests_find_no_server_error(settings: Settings, ports: Ports) -> None:
    """Generated requests never get a 5xx or an undocumented status, type or body."""
    async with serving(settings, ports, Role.API) as api:
        base_url = str(api.http.base_url).rstrip("/")
        failures = await anyio.to_thread.run_sync(_fuzz, base_url)
    assert not failures, "\n\n".join(failures)
