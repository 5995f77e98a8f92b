"""Why a file may end `failed`: the only reasons the contract allows, in one place.

A handler's own failure is stored as its exception (`execution.describe`); every
other reason is one of these texts, so operators, tests and the run summary can
tell them apart. A stop, a release or a dependency error is never a reason.
"""

from __future__ import annotations

from typing import Final

# The batch's deadline passed before the file finished.
TIMED_OUT: Final = "timed out: the batch deadline passed before this file finished"
# Its last attempt had started when the worker running it died (crash, OOM, SIGKILL).
LAST_ATTEMPT_LOST: Final = "the worker died while running the file's last attempt"
# The job on the stream could not be decoded; the detail follows the prefix.
UNDECODABLE: Final = "job could not be decoded: "
# The handler returned, but Postgres refused its result; the detail follows.
UNSTORABLE: Final = "the handler's outcome could not be stored: "
# An operator cancelled the batch before the file finished.
CANCELLED: Final = "cancelled: an operator cancelled the batch before this file finished"
