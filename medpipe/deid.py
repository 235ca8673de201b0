"""De-identification: keyed pseudonyms and the DICOM allow-list (PS3.15 Annex E spirit: keep only what is needed).

- `pseudonym(value, key)`: HMAC-SHA256, hex. A keyed hash, not a plain one: a plain hash of a medical record number
  can be reversed by hashing every possible number; without the key that is impossible.
- `deid_key_from_env()`: the key comes from MEDPIPE_DEID_KEY (configuration, never code, never YAML). There is no
  default key: a run that needs one and has none stops and says how to set it.
- `dicom_allowed_fields(ds)`: the only DICOM header values that leave ingest (medpipe.schema.DICOM_FIELDS).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any, Optional

from medpipe.errors import ConfigError
from medpipe.schema import DICOM_FIELDS

DEID_KEY_ENV = "MEDPIPE_DEID_KEY"
MIN_KEY_LENGTH = 16

_FLOAT_FIELDS = {"PixelSpacing"}
_INT_FIELDS = {"Rows", "Columns"}
_MAX_TEXT = 64  # allow-listed strings are short codes (CT, CHEST, PA); anything longer is not what we expect


def pseudonym(value: str, key: bytes | str) -> str:
    """HMAC-SHA256 of `value` under `key`, as 64 hex characters. Stable for a given key."""
    key_bytes = key.encode("utf-8") if isinstance(key, str) else key
    return hmac.new(key_bytes, value.encode("utf-8"), hashlib.sha256).hexdigest()


def deid_key_from_env(required: bool = True, environ: Optional[dict] = None) -> Optional[bytes]:
    """The HMAC key from MEDPIPE_DEID_KEY; a ConfigError saying how to set it when required and missing/short."""
    env = os.environ if environ is None else environ
    value = env.get(DEID_KEY_ENV, "")
    if not value:
        if not required:
            return None
        raise ConfigError(
            f"{DEID_KEY_ENV} is not set: it is the secret key for patient pseudonyms (HMAC-SHA256) and medpipe never "
            f"uses a default. Set it from your secret store, e.g. `export {DEID_KEY_ENV}=$(openssl rand -hex 32)`, "
            f"and keep the same key for every run whose splits must agree"
        )
    if len(value) < MIN_KEY_LENGTH:
        raise ConfigError(f"{DEID_KEY_ENV} is {len(value)} characters; use at least {MIN_KEY_LENGTH} "
                          f"(e.g. `openssl rand -hex 32`)")
    return value.encode("utf-8")


def dicom_allowed_fields(ds: Any) -> dict[str, Any]:
    """Allow-listed attributes of a pydicom Dataset as {record key: value}; absent or malformed ones are omitted.

    Strings are stripped and capped; numbers are typed. Nothing outside DICOM_FIELDS is ever read into the result.
    """
    out: dict[str, Any] = {}
    for keyword, record_key in DICOM_FIELDS.items():
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001 - a malformed element is simply not exported
            continue
        if value is None or value == "":
            continue
        try:
            if keyword in _FLOAT_FIELDS:
                items = list(value) if hasattr(value, "__len__") and not isinstance(value, str) else [value]
                out[record_key] = [float(v) for v in items]
            elif keyword in _INT_FIELDS:
                out[record_key] = int(value)
            else:
                text = str(value).strip()
                if text:
                    out[record_key] = text[:_MAX_TEXT]
        except (TypeError, ValueError):
            continue
    return out
