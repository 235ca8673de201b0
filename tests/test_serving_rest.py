"""The REST layer of `medpipe serve` under the trial's hostile clients: malformed HTTP, slow connections, an idle TLS
connection. The server runs in-process (uvicorn on its own thread) over a real ModelManager of an empty repository:
what is tested here is HTTP, not a model; requests that need a model are in test_serving.py.
"""

from __future__ import annotations

import datetime as dt
import json
import selectors
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

READ_TIMEOUT = 1.5


def self_signed(tmp_path: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key (PEM files), generated for this test."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def start(tmp_path: Path, tls: tuple | None = None):
    from serving.manager import ModelManager
    from serving.rest import start_rest
    from serving.metrics import ServerMetrics
    from serving.server import Service

    service = Service(ModelManager(tmp_path, None, None), ServerMetrics())
    server = start_rest(service, "127.0.0.1", 0, 2**20, "/monitoring/prometheus/metrics", tls, READ_TIMEOUT)
    return server, server.socket.getsockname()[1]


@pytest.fixture
def rest(tmp_path):
    server, port = start(tmp_path)
    yield port
    server.shutdown()


def exchange(port: int, raw: bytes, timeout: float = 10) -> bytes:
    """Send RAW bytes on a fresh connection and read until the server closes it or answers one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return int(value)
    return 0


def assert_answered(port: int, scheme: str = "http", verify=True) -> None:
    """A good request on a new connection gets TF Serving's JSON answer promptly (404: the repository is empty)."""
    response = httpx.get(f"{scheme}://127.0.0.1:{port}/v1/models/brain_mri", timeout=5, verify=verify)
    assert response.status_code == 404 and "error" in response.json()


@pytest.mark.slow
@pytest.mark.parametrize("header", [b"Content-Length: abc", b"Content-Length: -5",
                                    b"Content-Length: 3\r\nContent-Length: 4", b"Content-Length: 1e3"])
def test_a_bad_content_length_gets_400_not_a_dropped_connection(rest, header):
    answer = exchange(rest, b"POST /v1/models/brain_mri:predict HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert_answered(rest)


@pytest.mark.slow
def test_routes_and_sizes_get_tf_serving_json_errors(rest):
    answer = exchange(rest, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404") and b'"error"' in answer
    answer = exchange(rest, b"GET /v1/models/m/versions/" + b"9" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]  # not a route: never an int() of 5,000 digits
    big = b"x" * (2**20 + 10)
    answer = exchange(rest, b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big)
                      + big)
    assert answer.startswith(b"HTTP/1.1 413") and b"exceeds" in answer
    answer = exchange(rest, b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413")
    answer = exchange(rest, b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 2**20 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")  # h11 refuses an unfinished header block over 16 kB
    assert_answered(rest)


@pytest.mark.slow
def test_a_body_that_stops_arriving_gets_408(rest):
    start_time = time.monotonic()
    answer = exchange(rest, b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"in")
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert time.monotonic() - start_time < READ_TIMEOUT + 5


@pytest.mark.slow
def test_1500_slow_connections_are_timed_out_while_good_requests_are_answered(rest):
    """The trial's slow-loris: connections that send part of their headers and then nothing."""
    selector = selectors.DefaultSelector()
    sockets = []
    try:
        for i in range(1500):
            sock = socket.create_connection(("127.0.0.1", rest), timeout=5)
            sock.sendall(b"GET /v1/models/brain_mri HTTP/1.1\r\nHost: x\r\nX-Slow: " if i % 2 else b"")
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, bytearray())
            sockets.append(sock)
        assert_answered(rest)  # while 1,500 connections hang
        received: dict[int, bytes] = {}
        deadline = time.monotonic() + READ_TIMEOUT + 30
        while len(received) < len(sockets) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1):
                try:
                    chunk = key.fileobj.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    key.data.extend(chunk)
                else:  # closed by the server
                    received[key.fileobj.fileno()] = bytes(key.data)
                    selector.unregister(key.fileobj)
        assert len(received) == len(sockets), f"{len(sockets) - len(received)} slow connections still open"
        assert all(data.startswith(b"HTTP/1.1 408") for data in received.values())
    finally:
        for sock in sockets:
            sock.close()
    assert_answered(rest)


@pytest.mark.slow
def test_slow_connections_get_a_408_before_the_close(rest):
    with socket.create_connection(("127.0.0.1", rest), timeout=READ_TIMEOUT + 10) as sock:
        sock.sendall(b"GET /v1/models/brain_mri HTTP/1.1\r\nHo")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408") and b"did not arrive in time" in data


@pytest.mark.slow
def test_with_tls_an_idle_tcp_connection_blocks_no_one(tmp_path):
    cert, key = self_signed(tmp_path)
    server, port = start(tmp_path, tls=(cert, key))
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]  # TCP only: no TLS handshake
    try:
        context = ssl.create_default_context(cafile=cert)
        assert_answered(port, "https", verify=context)  # within its 5 s client timeout
        assert httpx.get(f"https://127.0.0.1:{port}/monitoring/prometheus/metrics", verify=context,
                         timeout=5).status_code == 200
    finally:
        for sock in idle:
            sock.close()
        server.shutdown()


def test_tf_serving_metrics_are_written_by_prometheus_client_with_escaped_labels():
    """TF Serving's names and label values (entrypoint GRPC/REST, load status success/fail) survive exposition, and
    a label value with a quote, backslash or newline is escaped (parsed back exactly)."""
    from prometheus_client.parser import text_string_to_metric_families

    from serving.metrics import ServerMetrics

    metrics = ServerMetrics()
    odd = 'a"b\\c\nd'
    metrics.tf.request(odd, "predict", "GRPC", True, 0.0007)
    metrics.tf.request("m", "predict", "REST", False, 2.0)
    metrics.tf.load("m", ok=False)
    text = metrics.render()
    assert ':tensorflow:serving:request_count{model_name="m",status="ERROR"} 1.0' in text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[(":tensorflow:serving:request_count", (("model_name", odd), ("status", "OK")))] == 1
    grpc_1ms = (("API", "predict"), ("entrypoint", "GRPC"), ("le", "1000"), ("model_name", odd))
    assert samples[(":tensorflow:serving:request_latency_bucket", grpc_1ms)] == 1
    rest_1ms = (("API", "predict"), ("entrypoint", "REST"), ("le", "1000"), ("model_name", "m"))
    assert samples[(":tensorflow:serving:request_latency_bucket", rest_1ms)] == 0
    assert samples[(":tensorflow:serving:request_latency_sum", (("API", "predict"), ("entrypoint", "REST"),
                                                                 ("model_name", "m")))] == 2e6
    assert samples[(":tensorflow:cc:saved_model:load_attempt_count", (("model_path", "m"), ("status", "fail")))] == 1
