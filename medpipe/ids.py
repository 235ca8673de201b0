"""Request ids: the one rule for an id a caller sends (gRPC `x-request-id` metadata, REST `X-Request-Id`).

Ids are written to logs and request summaries, so a free-text id would let a caller write anything there (a patient's
name, an MRN, control characters). Used by the gateway's doors and the viewer.
"""

from __future__ import annotations

import re
import uuid

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def sanitize_request_id(value: str | None) -> str:
    """VALUE when it matches [A-Za-z0-9._-]{1,64} exactly, else a freshly generated id (uuid4 hex, 32 characters).

    The refused value is dropped, never logged: it is what the rule keeps out of the logs."""
    if isinstance(value, str) and REQUEST_ID_PATTERN.fullmatch(value):
        return value
    return uuid.uuid4().hex
