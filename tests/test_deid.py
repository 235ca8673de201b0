"""Pseudonyms are keyed (HMAC-SHA256), the key has no default, and only allow-listed DICOM fields come out."""

from __future__ import annotations

import hashlib
import hmac

import pydicom
import pytest

import fixtures_adversarial as fa
from medpipe import deid
from medpipe.errors import ConfigError
from medpipe.schema import DICOM_FIELDS


def test_pseudonym_is_rfc4231_hmac_sha256():
    # RFC 4231 test case 2
    assert deid.pseudonym("what do ya want for nothing?", b"Jefe") == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")


def test_pseudonym_depends_on_the_key_and_is_not_a_plain_hash():
    value = "MRN-0001"
    one, two = deid.pseudonym(value, "key-one-0123456789"), deid.pseudonym(value, "key-two-0123456789")
    assert one != two and len(one) == 64
    assert one != hashlib.sha256(value.encode()).hexdigest()
    assert one == hmac.new(b"key-one-0123456789", value.encode(), hashlib.sha256).hexdigest()


def test_key_from_environment():
    assert deid.deid_key_from_env(environ={"MEDPIPE_DEID_KEY": "k" * 32}) == b"k" * 32
    assert deid.deid_key_from_env(required=False, environ={}) is None
    with pytest.raises(ConfigError, match="MEDPIPE_DEID_KEY.*openssl rand"):
        deid.deid_key_from_env(environ={})
    with pytest.raises(ConfigError, match="at least 16"):
        deid.deid_key_from_env(environ={"MEDPIPE_DEID_KEY": "short"})


def test_only_allow_listed_fields_leave(tmp_path):
    planted = fa.phi_dicom(tmp_path / "phi.dcm")
    ds = pydicom.dcmread(tmp_path / "phi.dcm")
    fields = deid.dicom_allowed_fields(ds)
    assert set(fields) <= set(DICOM_FIELDS.values())
    assert fields["dicom/modality"] == "CT" and fields["dicom/rows"] == 512
    assert fields["dicom/pixel_spacing"] == pytest.approx([0.46875, 0.46875])
    text = repr(fields)
    assert not any(marker in text for marker in planted)
