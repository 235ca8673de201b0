"""`medpipe gateway`: start the gRPC and REST doors in front of TF Serving (see serving/gateway/__init__.py)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import ssl
import sys
import threading
from typing import Sequence

from medpipe.errors import ConfigError
from serving.listen import announce, bind_rest

log = logging.getLogger("medpipe.gateway")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medpipe gateway",
        description="The clinical gateway: one authenticated, audited front door (TF Serving's gRPC and REST APIs, "
        "DICOM/PNG/JPEG/TIFF in) in front of TF Serving. See README.md and docs/operations.md.")
    parser.add_argument("--upstream", required=True, help="TF Serving gRPC HOST:PORT (tensorflow/serving or "
                        "medpipe serve)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--grpc-port", type=int, default=8500, help="gRPC port (0 = any free port)")
    parser.add_argument("--rest-port", type=int, default=8501, help="REST + metrics port (0 = any free port)")
    parser.add_argument("--tls-cert", help="PEM server certificate for both doors (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--client-ca", help="PEM CA that signs client certificates (mTLS; identity = the "
                        "certificate subject; scopes from the config's identities)")
    parser.add_argument("--jwt-key", help="PEM public key or JWKS file that verifies bearer tokens")
    parser.add_argument("--jwt-audience", help="required `aud` of bearer tokens")
    parser.add_argument("--jwt-issuer", help="required `iss` of bearer tokens")
    parser.add_argument("--allow-anonymous", action="store_true",
                        help="callers without credentials get the config's anonymous_scopes (loopback only: the demo)")
    parser.add_argument("--audit-log", required=True, help="hash-chained JSON lines audit file (appended, 0600)")
    audit = parser.add_argument_group("audit trail (docs/operations.md \"Audit trail\")")
    audit.add_argument("--audit-key", help="secret file (>= 32 random bytes, mode 0600): every audit line carries an "
                       "HMAC-SHA256 chained over the previous one; no default")
    audit.add_argument("--audit-anchor", help="FILE or syslog+tls://HOST:PORT: signed checkpoints of the chain's head "
                       "(needs --audit-key); medpipe audit verify --anchor then shows a cut tail")
    audit.add_argument("--audit-checkpoint-seconds", type=float, default=5.0,
                       help="seconds between checkpoints (default 5): the most of a tail a cut can hide")
    audit.add_argument("--audit-syslog", help="syslog+tls://HOST:PORT: ship every audit line (RFC 5424 over RFC 5425 "
                       "TLS; the backlog waits in the audit file while the receiver is down)")
    audit.add_argument("--audit-syslog-format", choices=("json", "dicom"), default="json",
                       help="the syslog MSG: the JSON audit record (default) or a DICOM PS3.15 A.5 AuditMessage (XML, "
                       "as IHE ATNA audit repositories parse it)")
    audit.add_argument("--audit-syslog-ca", help="PEM CA of the syslog receiver's certificate")
    audit.add_argument("--audit-syslog-cert", help="PEM client certificate for the syslog receiver (optional)")
    audit.add_argument("--audit-syslog-key", help="PEM key of --audit-syslog-cert")
    parser.add_argument("--request-log", help="folder for requests-YYYY-MM-DD.jsonl (read by medpipe monitor and "
                        "medpipe feedback)")
    parser.add_argument("--config", help="gateway config YAML: limits, certificate identities (config/gateway.yaml)")
    parser.add_argument("--drift-baseline", help="ingest stats.json (or its folder): export drift gauges")
    parser.add_argument("--model-repository", help="the TF Serving model repository, read-only: preprocessing "
                        "settings from each version's assets/preprocessing.json (default: from the model's "
                        "metadata: image size and channels only)")
    parser.add_argument("--upstream-ca", help="PEM CA of the upstream's certificate: talk TLS to TF Serving")
    parser.add_argument("--upstream-cert", help="PEM client certificate for the upstream (mTLS)")
    parser.add_argument("--upstream-key", help="PEM key of --upstream-cert")
    parser.add_argument("--threads", type=int, default=16, help="gRPC worker threads")
    # the PACS road (serving/gateway/pacs.py): DIMSE C-STORE SCP, STOW-RS at /dicom-web/studies, SR results
    parser.add_argument("--dicom-port", type=int, help="DICOM C-STORE/C-ECHO SCP port (0 = any free port)")
    parser.add_argument("--dicom-ae-title", default="MEDPIPE", help="the SCP's AE title (default MEDPIPE)")
    parser.add_argument("--dicom-tls", action="store_true",
                        help="DICOM TLS on the SCP: TLS only, with --tls-cert/--tls-key, client certificates signed "
                        "by --client-ca required (plus the calling-AE allow-list)")
    parser.add_argument("--results-to", help="where SRs go: dicomweb+http(s)://HOST:PORT/ROOT (STOW-RS), "
                        "dimse://AET@HOST:PORT (C-STORE) or dimse+tls://AET@HOST:PORT (C-STORE over TLS: "
                        "--results-ca, and --tls-cert/--tls-key as client certificate); enables STOW-RS")
    parser.add_argument("--results-ca", help="PEM CA that signs the certificate of a dimse+tls:// --results-to")
    parser.add_argument("--pacs-config", help="routing, stability, calling-AE allow-list, spool (config/pacs.yaml)")
    viewer = parser.add_argument_group("web viewer (/viewer/ on the REST port)")
    viewer.add_argument("--viewer-users", help="local users file (medpipe viewer-users add): sign-in with a "
                        "password; without it the viewer accepts the gateway's own identities only")
    viewer.add_argument("--feedback-dir", help="where readers' confirmed/corrected labels go (confirmed.csv + "
                        "images/, the input of medpipe feedback); without it the viewer takes no feedback")
    viewer.add_argument("--drift-reports", help="folder of medpipe monitor outputs shown on the model page")
    viewer.add_argument("--viewer-model", action="append", default=[], dest="viewer_models",
                        help="model offered in the viewer (repeatable; default: every model of --model-repository)")
    return parser


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(args) -> None:
    """Safe by default: refuse any combination that would expose models without authentication."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.client_ca and not args.tls_cert:
        raise ConfigError("--client-ca (mTLS) needs TLS: pass --tls-cert and --tls-key")
    if args.allow_anonymous and not is_loopback(args.host):
        raise ConfigError(f"--allow-anonymous is for the loopback demo only; it is refused on --host {args.host}. "
                          "Use client certificates (--client-ca) or bearer tokens (--jwt-key)")
    viewer_users = getattr(args, "viewer_users", None)
    if viewer_users and not args.tls_cert and not is_loopback(args.host):
        raise ConfigError("--viewer-users signs readers in with passwords: serve it over TLS (--tls-cert, --tls-key) "
                          "or on a loopback --host")
    if not (args.client_ca or args.jwt_key or args.allow_anonymous or viewer_users):
        raise ConfigError("no way to authenticate: pass --client-ca (mTLS) and/or --jwt-key (bearer tokens), "
                          "--viewer-users (the web viewer's local accounts), or --allow-anonymous for a loopback demo")
    if not args.tls_cert and not is_loopback(args.host):
        raise ConfigError(f"listening on {args.host} without TLS would send credentials and images in clear: "
                          "pass --tls-cert and --tls-key")
    if bool(args.upstream_cert) != bool(args.upstream_key):
        raise ConfigError("--upstream-cert and --upstream-key go together")
    if getattr(args, "audit_anchor", None) and not getattr(args, "audit_key", None):
        raise ConfigError("--audit-anchor needs --audit-key: the checkpoints are signed with it")
    syslog = getattr(args, "audit_syslog", None) or (getattr(args, "audit_anchor", None) or "").startswith("syslog")
    if syslog and not getattr(args, "audit_syslog_ca", None):
        raise ConfigError("syslog over TLS needs --audit-syslog-ca (the CA of the receiver's certificate)")
    if bool(getattr(args, "audit_syslog_cert", None)) != bool(getattr(args, "audit_syslog_key", None)):
        raise ConfigError("--audit-syslog-cert and --audit-syslog-key go together")
    if getattr(args, "audit_checkpoint_seconds", 5.0) <= 0:
        raise ConfigError("--audit-checkpoint-seconds must be > 0")
    if getattr(args, "dicom_tls", False) and not (args.tls_cert and args.client_ca):
        raise ConfigError("--dicom-tls serves the DICOM port with the gateway's certificate and requires client "
                          "certificates: pass --tls-cert, --tls-key and --client-ca")


def rest_server(gateway, app, host: str, port: int, tls: tuple | None, client_ca: str | None,
                max_connections: int | None = None):
    """-> (uvicorn.Server, bound socket). The socket is bound here so that port 0 works and is known.

    Connections are limited by the protocol (serving.gateway.connections), not by uvicorn's limit_concurrency
    (which counts requests, accepts every socket and answers 503 to probes while idle sockets pile up); TLS is
    started by the protocol too, so that handshakes count and time out like request heads."""
    import uvicorn

    from serving.gateway.connections import AcceptRate, ConnectionGuard
    from serving.gateway.rest import make_protocol

    limits = gateway.config.limits
    sock = bind_rest(host, port)
    sock.set_inheritable(True)
    context = tls_context(tls, client_ca) if tls else None
    if context is not None and client_ca:
        audit_tls_refusals(context, gateway)
    guard = ConnectionGuard(max_connections or limits.max_connections,
                            AcceptRate(limits.accept_rate_per_s, limits.accept_burst),
                            on_refuse=lambda limit: refuse_connection(gateway, limit))
    config = uvicorn.Config(
        app, http=make_protocol(limits.header_timeout_s, gateway.metrics, guard, context, gateway.transport_refusals),
        loop="asyncio", lifespan="off", timeout_keep_alive=limits.idle_timeout_s, h11_max_incomplete_event_size=32 * 1024,
        access_log=False, server_header=False, log_level="warning", backlog=4096,
        log_config=None)  # uvicorn's dictConfig would close our log handlers: each line then reopens the file
    server = uvicorn.Server(config)
    return server, sock


def refuse_connection(gateway, limit: str) -> None:
    """A socket the connection guard closed (max_connections, per-address accept rate): counted, and audited through
    the aggregated transport refusals (one line each up to a rate, then a per-second summary)."""
    gateway.metrics.limits.labels(limit).inc()
    gateway.transport_refusals.refused("rest", limit, None, "the gateway closed the connection: "
                                       + ("too many new connections from this address" if limit == "accept_rate"
                                          else "at its connection limit") + "; retry with backoff", code="UNAVAILABLE")


def tls_context(tls: tuple, client_ca: str | None) -> ssl.SSLContext:
    """The REST door's server context: the --tls-cert chain; with --client-ca, a client certificate is verified
    when presented (CERT_OPTIONAL: bearer tokens need none)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls[0], tls[1])
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def audit_tls_refusals(context: ssl.SSLContext, gateway) -> None:
    """Audit a client certificate the TLS layer refused (another CA, expired): the request never reaches the app.

    Python exposes no verification hook, only OpenSSL's message callback (`SSLContext._msg_callback`, present since
    3.8): an alert we send during a handshake is the refusal. The peer address is not known at that layer."""
    if not hasattr(context, "_msg_callback"):
        log.warning("this Python cannot audit TLS handshake refusals (no SSLContext._msg_callback)")
        return
    from serving.gateway.core import GatewayError

    refusals = {"UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED",
                "UNSUPPORTED_CERTIFICATE", "CERTIFICATE_UNKNOWN", "CERTIFICATE_REQUIRED", "DECRYPT_ERROR",
                "ACCESS_DENIED"}

    def on_message(conn, direction, version, content_type, msg_type, data):
        if direction != "write" or content_type != ssl._TLSContentType.ALERT:
            return
        alert = getattr(msg_type, "name", str(msg_type))
        if alert in refusals:
            try:
                gateway.refused("rest", None, None, GatewayError(
                    "UNAUTHENTICATED", f"client certificate refused at the TLS handshake ({alert.lower()}); "
                    "present a certificate signed by the gateway's client CA"), event="tls_handshake")
            except GatewayError:  # the audit trail cannot be written: the handshake is refused either way
                pass

    context._msg_callback = on_message


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_options(args)
    sys.setswitchinterval(0.0005)  # see serving.server: a woken thread should not wait 5 ms for the GIL
    from serving.gateway.connections import raise_fd_limit, throttle_logging

    throttle_logging()  # a failure repeated per connection or per loop turn is one line a minute, with a count
    logging.raiseExceptions = False  # a log line that cannot be written is dropped, not a traceback on stderr
    from serving.gateway.core import Gateway
    from serving.gateway.grpc_door import start_grpc
    from serving.gateway.rest import build_app

    gateway = Gateway(args)
    from serving.gateway.pacs import start_pacs

    pacs = start_pacs(gateway, args)  # None unless --results-to / --dicom-port
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    connections = raise_fd_limit(gateway.config.limits.max_connections)  # per door, under the fd limit
    grpc_server, grpc_port = start_grpc(gateway, args.host, args.grpc_port, tls, args.client_ca, args.threads,
                                        max_connections=connections)
    app = build_app(gateway)
    server, sock = rest_server(gateway, app, args.host, args.rest_port, tls, args.client_ca, connections)
    rest_port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="rest")
    thread.start()
    scheme = "https" if tls else "http"
    # one parseable line: tests and the demo read the bound ports from it
    announce("gateway", f"{args.host}:{grpc_port}", f"{scheme}://{args.host}:{rest_port}",
             f" upstream {args.upstream}")

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    while not stopping.wait(0.5):
        if not thread.is_alive():
            log.error("the REST door stopped")
            break
    server.should_exit = True
    if pacs is not None:
        pacs.stop()
    grpc_server.stop(grace=5).wait()
    thread.join(timeout=10)
    gateway.close()
    return 0


if __name__ == "__main__":
    from medpipe.cli import module_main

    module_main(main)
