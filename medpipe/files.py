"""Atomic file writes: a temporary name in the same folder, then os.replace, so a reader (a polling server, the
gate, a DAG task, a browser) sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int = 0o666) -> None:
    """Write DATA (text is UTF-8) to PATH; MODE (before the umask) is e.g. 0o600 for a file of secrets."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, payload: Any, **dumps: Any) -> None:
    """PAYLOAD as indented JSON plus a newline; DUMPS go to json.dumps (e.g. sort_keys=True)."""
    write_atomic(path, json.dumps(payload, indent=2, **dumps) + "\n")
