"""Test support for the gateway: generated PKI (CA, server, client, a foreign CA), JWTs, and process helpers.

Certificates and keys are generated with `cryptography` per test session into a temporary folder; nothing here is
a secret of any deployment.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, TEST_DEID_KEY


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, org: str = "medpipe tests"):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, cert, key) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _certificate(subject, issuer, public_key, signing_key, *, ca: bool, server: bool = False, days: int = 2):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def make_pki(folder: Path) -> dict[str, Path]:
    """ca, server, client (signed by ca), rogue_ca and rogue client (signed by rogue_ca), JWT key pair."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for prefix in ("", "rogue_"):
        ca_key = _key()
        ca_name = _name(f"{prefix or 'medpipe '}test CA")
        ca = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
        paths[f"{prefix}ca"], _ = _write(folder, f"{prefix}ca", ca, ca_key)
        client_key = _key()
        client = _certificate(_name(f"{prefix}client"), ca_name, client_key.public_key(), ca_key, ca=False)
        paths[f"{prefix}client_cert"], paths[f"{prefix}client_key"] = _write(folder, f"{prefix}client", client,
                                                                             client_key)
        if not prefix:
            server_key = _key()
            server = _certificate(_name("localhost"), ca_name, server_key.public_key(), ca_key, ca=False, server=True)
            paths["server_cert"], paths["server_key"] = _write(folder, "server", server, server_key)
            other_key = _key()  # signed by the right CA, but its subject is not in the identities table
            other = _certificate(_name("unlisted"), ca_name, other_key.public_key(), ca_key, ca=False)
            paths["unlisted_cert"], paths["unlisted_key"] = _write(folder, "unlisted", other, other_key)
    for stem in ("jwt", "rogue_jwt"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (folder / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / f"{stem}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        paths[f"{stem}_private"], paths[f"{stem}_public"] = folder / f"{stem}.key", folder / f"{stem}.pub"
    return paths


CLIENT_SUBJECT = "CN=client,O=medpipe tests"
UNLISTED_SUBJECT = "CN=unlisted,O=medpipe tests"


def token(private_key: Path, sub: str = "dr-test", scope: str = "predict:*", expires_in: float = 600) -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": sub, "scope": scope, "iat": now, "exp": now + int(expires_in)},
                      private_key.read_text(), algorithm="RS256")


def start_gateway(args: list[str], log: Path, timeout: float = 90) -> tuple[subprocess.Popen, str, str]:
    """`python -m serving.gateway ARGS` with ports chosen by the OS; -> (process, grpc address, rest url)."""
    from serving.listen import wait_listening

    process = subprocess.Popen([sys.executable, "-m", "serving.gateway", "--grpc-port", "0", "--rest-port", "0",
                                *args], cwd=ROOT,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "MEDPIPE_DEID_KEY": TEST_DEID_KEY},
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        match = wait_listening(log, process, timeout=timeout)
    except RuntimeError as exc:
        process.kill()
        raise AssertionError(f"{exc}: {log.read_text()[-3000:]}") from None
    return process, match["grpc"], match["rest"]


def stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=10)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def huge_png(width: int, height: int) -> bytes:
    """A real, fully decodable grey PNG of width x height, built row by row (never width*height bytes in memory)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x07" * width
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (MB): the gateway with its decode workers."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


@contextlib.contextmanager
def tiny_tmpfs(folder: Path, size_kb: int):
    """A real tmpfs of `size_kb` mounted at `folder`, unmounted afterwards (root only: skipped elsewhere)."""
    import pytest

    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); run as root to test a full disk")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
