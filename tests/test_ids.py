"""medpipe.ids.sanitize_request_id: the one rule for caller-supplied request ids (the gateway and
the viewer). A trailing newline is refused too: the gateway's former copy (re.match with $) let it through."""

from __future__ import annotations

import re

import pytest

from medpipe.ids import sanitize_request_id


@pytest.mark.parametrize("value", ["a", "req-42", "A.b_C-9", "x" * 64, "2026-11-30T16.25.38Z"])
def test_a_well_formed_id_is_kept(value):
    assert sanitize_request_id(value) == value


@pytest.mark.parametrize("value", [None, "", "x" * 65, "ZZSECRET JANE DOE", "JANE^DOE", "id\nforged-log-line",
                                   "req-1\n", "mrn:99887766", "caf\u00e9", "\u0661\u0662", "a/b", "id\x00", "a" * 10_000])
def test_anything_else_is_replaced_by_a_generated_id(value):
    generated = sanitize_request_id(value)
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert generated != sanitize_request_id(value)  # fresh each time, never derived from the value
