"""What `medpipe serve` and the gateway share on the wire (the gateway never imports the stand-in server): listening
sockets, bound here (port 0: the OS picks one, so nothing races for it), the one line announcing the bound ports
and its reader (the demo, tests, benchmarks), and the ModelSpec version choice."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

from medpipe.errors import ConfigError

LISTENING = re.compile(r"medpipe (?P<program>serve|gateway): gRPC (?P<grpc>\S+) REST (?P<rest>\S+)")


def spec_version(spec) -> tuple[int | None, str | None]:
    """A tensorflow.serving.ModelSpec's (version, label): at most one is set."""
    which = spec.WhichOneof("version_choice")
    if which == "version":
        return spec.version.value, None
    if which == "version_label":
        return None, spec.version_label
    return None, None


def bind_grpc(server, host: str, port: int, tls: tuple | None, client_ca: str | None = None) -> int:
    """Add the (TLS) port to a grpc.Server; -> the bound port. With client_ca, clients need a certificate it signed."""
    import grpc

    address = f"{host}:{port}"
    if tls:
        credentials = grpc.ssl_server_credentials(
            [(Path(tls[1]).read_bytes(), Path(tls[0]).read_bytes())],
            root_certificates=Path(client_ca).read_bytes() if client_ca else None,
            require_client_auth=bool(client_ca))
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise ConfigError(f"cannot listen on {address} for gRPC (port in use?); choose another --grpc-port")
    return bound


def bind_rest(host: str, port: int) -> socket.socket:
    """A listening socket for uvicorn, bound here so that a taken port is a ConfigError and port 0 is known."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} for REST ({exc.strerror}); choose another --rest-port")
    sock.listen(2048)
    return sock


def announce(program: str, grpc_address: str, rest_url: str, extra: str = "") -> None:
    print(f"medpipe {program}: gRPC {grpc_address} REST {rest_url}{extra}", flush=True)


def wait_listening(log: Path, process: subprocess.Popen, pattern: re.Pattern = LISTENING,
                   timeout: float = 120.0) -> re.Match:
    """Wait for the process's announce line (`pattern`) in its log; -> the match (LISTENING: ["grpc"] HOST:PORT,
    ["rest"] base URL). Raises RuntimeError naming the log when the process exits or stays silent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(log.read_text(errors="replace"))
        if match:
            return match
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with status {process.returncode} before listening; "
                               f"see {log}")
        time.sleep(0.2)
    raise RuntimeError(f"{process.args[0]} did not listen within {timeout:.0f} s; see {log}")
