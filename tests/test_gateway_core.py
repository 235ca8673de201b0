"""The gateway's pure parts, without sockets: the audit chain, identities, limits, request parsing, options."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from argparse import Namespace

import pytest

from conftest import ROOT
from serving.gateway import audit
from serving.gateway.core import (ERRORS, GatewayError, Principal, RateLimiter, may_call, sanitize_request_id)


# ---- audit log ---------------------------------------------------------------------------------------------------
def _log(path, count=5):
    log = audit.AuditLog(path)
    for i in range(count):
        log.append({"event": "predict", "identity": f"user-{i}", "outcome": "OK"})
    log.close()
    return path.read_bytes().splitlines(keepends=True)


def _verify_cli(path):
    return subprocess.run([sys.executable, "-m", "medpipe.cli", "audit", "verify", str(path)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_audit_chain_verifies_and_continues_after_restart(tmp_path):
    path = tmp_path / "audit.jsonl"
    lines = _log(path, 3)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3] and records[0]["prev"] == audit.GENESIS
    assert records[1]["prev"] == audit.line_hash(lines[0])
    again = audit.AuditLog(path)  # a restarted gateway continues the same chain
    again.append({"event": "predict", "outcome": "OK"})
    again.close()
    assert audit.verify(path) is None
    result = _verify_cli(path)
    assert result.returncode == 0 and "4 records, hash chain intact" in result.stdout


def test_audit_lines_reach_the_disk_within_the_sync_window_and_on_close(tmp_path, monkeypatch):
    import os
    import time

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(audit.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_size), real_fsync(fd))[1])
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path, sync_seconds=0.5)
    for i in range(3):
        log.append({"event": "predict", "outcome": "OK"})
    deadline = time.monotonic() + 10
    while not synced and time.monotonic() < deadline:
        time.sleep(0.01)
    assert synced and synced[-1] == path.stat().st_size  # the three lines, in one fsync
    assert len(synced) == 1
    log.append({"event": "predict", "outcome": "OK"})
    log.close()  # the last line is synced before close returns, whatever the window
    assert synced[-1] == path.stat().st_size and len(path.read_bytes().splitlines()) == 4
    log.close()  # twice is harmless


@pytest.mark.parametrize("tamper, bad_line", [
    (lambda lines: lines[:2] + [lines[2].replace(b'"user-2"', b'"user-X"')] + lines[3:], 4),  # edit line 3
    (lambda lines: lines[:1] + lines[2:], 2),  # remove line 2
    (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], 2),  # reorder
    (lambda lines: lines[:4] + [b"{not json\n"], 5),
])
def test_audit_verify_names_the_first_bad_line(tmp_path, tamper, bad_line):
    path = tmp_path / "audit.jsonl"
    lines = _log(path)
    path.write_bytes(b"".join(tamper(lines)))
    assert audit.verify(path) == bad_line
    result = _verify_cli(path)
    assert result.returncode == 1 and f"line {bad_line} breaks the hash chain" in result.stderr


def test_an_edit_that_keeps_the_hash_field_is_caught_on_the_next_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    lines = _log(path)
    edited = json.loads(lines[1])
    edited["outcome"] = "PERMISSION_DENIED"
    lines[1] = json.dumps(edited, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    assert audit.verify(path) == 3


# ---- identities, codes, limits -----------------------------------------------------------------------------------
def test_scopes_and_error_table():
    reader = Principal("CN=viewer", frozenset({"predict:brain_mri"}), "mtls")
    assert may_call(reader, "brain_mri") and not may_call(reader, "chest_xray")
    assert may_call(Principal("svc", frozenset({"predict:*"}), "jwt"), "chest_xray")
    assert not may_call(Principal("x", frozenset({"predict:brain"}), "jwt"), "brain_mri")
    assert {code: http for code, (_, http) in ERRORS.items()}["RESOURCE_EXHAUSTED"] == 429
    assert GatewayError("RESOURCE_EXHAUSTED", "big", reason="body_size").http_status == 413
    assert GatewayError("PERMISSION_DENIED", "no").grpc_status.name == "PERMISSION_DENIED"
    with pytest.raises(ValueError):
        GatewayError("TEAPOT", "no")


def test_request_ids_are_sanitised():
    assert sanitize_request_id("study-7.a_b") == "study-7.a_b"
    for bad in ("Doe^John", "x" * 65, "a b", "", None, "../../etc"):
        fresh = sanitize_request_id(bad)
        assert fresh != bad and len(fresh) == 32


def test_rate_limiter_is_per_identity():
    limiter = RateLimiter(rate_per_minute=60)  # 1/s, burst 10
    assert all(limiter.allow("a", now=0.0) for _ in range(10))
    assert not limiter.allow("a", now=0.0) and limiter.allow("b", now=0.0)
    assert limiter.allow("a", now=1.0)  # one token back after a second


# ---- bearer tokens -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from gateway_support import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


def test_jwt_tokens(pki):
    from gateway_support import token

    from serving.gateway.auth import Authenticator
    from serving.gateway.config import GatewayConfig

    auth = Authenticator(GatewayConfig(), jwt_key=str(pki["jwt_public"]))
    who = auth.principal("Bearer " + token(pki["jwt_private"], scope="predict:brain_mri other"), None)
    assert who == Principal("dr-test", frozenset({"predict:brain_mri", "other"}), "jwt")
    cases = {"has expired": token(pki["jwt_private"], expires_in=-120),
             "signature does not verify": token(pki["rogue_jwt_private"]),
             "not valid": "not.a.jwt"}
    for words, bad in cases.items():
        with pytest.raises(GatewayError) as caught:
            auth.principal(f"Bearer {bad}", "CN=client,O=medpipe tests")  # a token decides, even with a cert
        assert caught.value.code == "UNAUTHENTICATED" and words in caught.value.message
    # an HMAC token signed with the public key's text must not verify (algorithm confusion)
    import jwt

    forged = jwt.encode({"sub": "x", "exp": 2**33}, "secret", algorithm="HS256")
    with pytest.raises(GatewayError):
        auth.principal(f"Bearer {forged}", None)
    with pytest.raises(GatewayError, match="no credentials"):
        auth.principal(None, None)


# ---- request parsing ---------------------------------------------------------------------------------------------
def test_rest_body_parsing_refuses_cheaply():
    from serving.gateway.rest import parse_predict

    image = {"b64": base64.b64encode(b"\x89PNG....").decode()}
    images, signature, row = parse_predict(json.dumps({"instances": [image]}).encode(), 64)
    assert images == [b"\x89PNG...."] and signature == "serving_default" and row
    images, signature, row = parse_predict(json.dumps({"inputs": {"image_bytes": [image]},
                                                       "signature_name": "explain"}).encode(), 64)
    assert signature == "explain" and not row
    bad = {b"[" * 100_000 + b"]" * 100_000: "nests too deeply", b'{"instances": [': "not valid JSON",
           json.dumps({"instances": [image], "signature_name": 7}).encode(): "signature_name",
           json.dumps({"instances": [image], "inputs": [image]}).encode(): "exactly one of",
           json.dumps({"instances": [{"b64": "@@"}]}).encode(): "not valid base64",
           json.dumps({"instances": [{"b64": "AA=="}] * 10_000}).encode(): "10000 images in one request"}
    for body, words in bad.items():
        with pytest.raises(GatewayError) as caught:
            parse_predict(body, 64)
        assert caught.value.code == "INVALID_ARGUMENT" and words in caught.value.message


def test_shape_bomb_tensor_is_refused_before_allocation():
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    from serving.gateway.tensors import image_batch

    bomb = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=3000)]), string_val=[b"a", b"b"])
    assert len(bomb.SerializeToString()) < 120
    with pytest.raises(GatewayError, match=r"declares shape \[3000\] but holds 2 values"):
        image_batch(bomb, 64)
    many = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"x"] * 100)
    with pytest.raises(GatewayError, match="send at most 64"):
        image_batch(many, 64)
    assert image_batch(tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"x"]), 64) == [b"x"]


# ---- options ---------------------------------------------------------------------------------------------------
def _options(**overrides):
    base = dict(tls_cert=None, tls_key=None, client_ca=None, jwt_key=None, allow_anonymous=False,
                host="127.0.0.1", upstream_cert=None, upstream_key=None)
    return Namespace(**{**base, **overrides})


def test_unsafe_option_combinations_are_refused():
    from medpipe.errors import ConfigError
    from serving.gateway.server import check_options

    check_options(_options(allow_anonymous=True))
    refused = {"loopback demo only": _options(allow_anonymous=True, host="0.0.0.0"),
               "no way to authenticate": _options(),
               "without TLS": _options(jwt_key="k.pem", host="10.0.0.5"),
               "needs TLS": _options(client_ca="ca.pem")}
    for words, options in refused.items():
        with pytest.raises(ConfigError, match=words):
            check_options(options)


def test_concurrency_limit_refuses_after_the_queue_timeout():
    from serving.gateway.core import ConcurrencyLimit

    slots = ConcurrencyLimit(1, queue_timeout_s=0.05)
    with slots:
        with pytest.raises(GatewayError) as refused:
            with slots:
                pass
    assert refused.value.code == "RESOURCE_EXHAUSTED" and refused.value.reason == "concurrency"
    assert refused.value.http_status == 429
    with slots:  # the slot is free again
        pass


def test_gateway_config_is_typed(tmp_path):
    from medpipe.errors import ConfigError
    from serving.gateway.config import load_gateway_config

    config = load_gateway_config(str(ROOT / "config" / "gateway.yaml"))
    assert config.limits.max_images == 64 and config.identities["CN=prometheus,O=medpipe"] == ("metrics:read",)
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits: {max_imagez: 3}\n")
    with pytest.raises(ConfigError, match="unknown key limits.max_imagez"):
        load_gateway_config(str(bad))
    bad.write_text("identities: {'CN=x': predict:*}\n")
    with pytest.raises(ConfigError, match="identities must map"):
        load_gateway_config(str(bad))


def test_an_exact_size_png_is_forwarded_as_sent():
    import io

    from PIL import Image

    from medpipe.config import load_config
    from medpipe.imaging import preprocess_bytes
    from serving.gateway.core import is_exact_png

    config = load_config(ROOT / "config" / "brain_mri.yaml")
    jpeg = sorted((ROOT / "sample_data" / "brain_mri" / "glioma").iterdir())[0].read_bytes()
    exact = preprocess_bytes(jpeg, config).png
    assert is_exact_png(exact, preprocess_bytes(exact, config, encode=False), config)
    assert not is_exact_png(jpeg, preprocess_bytes(jpeg, config, encode=False), config)

    def png(image: Image.Image, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "PNG", **options)
        return buffer.getvalue()

    side = config.image.size
    for other in (png(Image.new("RGB", (side, side), (10, 20, 30))),  # colour: converted to grey
                  png(Image.new("L", (side, side), 9), transparency=9),  # transparency: composited
                  png(Image.new("L", (side + 2, side + 2), 9))):  # another size: resized
        assert not is_exact_png(other, preprocess_bytes(other, config, encode=False), config)
