"""The DIMSE door: a C-STORE and C-ECHO SCP (pynetdicom) for `medpipe gateway --dicom-port N --dicom-ae-title T`.

- Calling AE titles must be on the PACS config's allow-list (`calling_aets`); with an empty list the SCP refuses to
  start (nothing is reachable without an explicit decision), and an unknown caller's association is rejected.
- Storage contexts: every storage SOP class pynetdicom knows, with the transfer syntaxes whose pixel data
  medpipe.imaging can decode here (pydicom's decoders that are available with the installed plugins), so an
  instance is never accepted in an encoding the model's preprocessing would then refuse.
- A C-STORE is answered only after the instance is on disk (PacsService.receive -> Spool.put, fsync'd): 0x0000;
  A700 when it could not be stored (too large, the spool disk under its reserve or full: the sender retries), C000
  when it is not a usable DICOM instance.
- The dataset streams to a file as its PDUs arrive (pynetdicom's STORE_RECV_CHUNKED_DATASET, in TMPDIR), PDUs are
  at most MAX_PDU bytes, and the file is copied into the spool in pieces: an instance is never whole in memory.
- DICOM TLS (`--dicom-tls`): the SCP speaks TLS only, with the gateway's certificate (--tls-cert/--tls-key), and
  requires a client certificate signed by --client-ca; each handshake runs in its association's thread, with a
  deadline (SOCKET_TIMEOUT_SECONDS), never in the accept loop.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any, Optional

from medpipe.errors import ConfigError

log = logging.getLogger("medpipe.gateway.dimse")

VERIFICATION = "1.2.840.10008.1.1"
MAX_PDU = 1 << 20  # the largest PDU a peer may send us: what one read holds in memory (pynetdicom's default is 16 KB)
SOCKET_TIMEOUT_SECONDS = 30.0  # a TLS peer silent this long in its handshake or within a PDU is dropped


def decodable_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes medpipe.imaging (pydicom + the installed pixel plugins) decodes, native ones first."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import (AllTransferSyntaxes, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                             ExplicitVRLittleEndian, ImplicitVRLittleEndian)

    native = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
    found = list(native)
    for uid in AllTransferSyntaxes:
        if uid in found or not uid.is_compressed:
            continue
        try:
            if get_decoder(uid).is_available:
                found.append(uid)
        except (NotImplementedError, ValueError):
            continue  # no decoder at all for this syntax (e.g. video)
    return [str(uid) for uid in found]


def build_ae(service: Any, ae_title: str, calling_aets: tuple[str, ...]):
    from pynetdicom import AE
    from pynetdicom.presentation import StoragePresentationContexts

    if not calling_aets:
        raise ConfigError("--dicom-port needs calling_aets in the PACS config (--pacs-config): the AE titles allowed "
                          "to send studies, e.g. calling_aets: [ORTHANC]; the DIMSE door never accepts anyone")
    if not 1 <= len(ae_title.strip()) <= 16:
        raise ConfigError(f"--dicom-ae-title {ae_title!r}: an AE title has 1 to 16 characters")
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True
    ae.require_calling_aet = list(calling_aets)
    ae.maximum_pdu_size = MAX_PDU  # bounded: 0 ("no limit") would let a peer send a 300 MB instance in one PDU
    syntaxes = decodable_transfer_syntaxes()
    for context in StoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    ae.add_supported_context(VERIFICATION)
    return ae


class _HandshakeInAssociation(ssl.SSLContext):
    """pynetdicom wraps each accepted socket in its (single) accept loop; a handshake done there would let one silent
    client stop every other association. Here the handshake is left to the first read, in the association's own
    thread, and the socket gets SOCKET_TIMEOUT_SECONDS: a client that stalls its handshake (or a PDU) is dropped."""

    def wrap_socket(self, sock, *args, **kwargs):
        sock.settimeout(SOCKET_TIMEOUT_SECONDS)
        return super().wrap_socket(sock, *args, **{**kwargs, "do_handshake_on_connect": False})


def server_tls_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    """The SCP's TLS: the gateway's certificate, client certificates required (DICOM PS3.15 B.1 TLS profile)."""
    context = _HandshakeInAssociation(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.load_verify_locations(client_ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def start_scp(service: Any, port: int, ae_title: str = "MEDPIPE", host: str = "0.0.0.0",
              ssl_context: Optional[ssl.SSLContext] = None):
    """Start the SCP in background threads; returns the pynetdicom server (`.shutdown()` stops it)."""
    from pynetdicom import _config, evt

    _config.STORE_RECV_CHUNKED_DATASET = True  # C-STORE datasets stream to a file (pynetdicom's documented switch)
    ae = build_ae(service, ae_title, service.config.calling_aets)
    handlers = [(evt.EVT_C_STORE, handle_store, [service]), (evt.EVT_C_ECHO, handle_echo),
                (evt.EVT_REJECTED, handle_rejected, [service])]
    server = ae.start_server((host, port), block=False, evt_handlers=handlers, ssl_context=ssl_context)
    log.info("DIMSE SCP %s listening on %s:%d%s (%d calling AE titles allowed)", ae_title, host,
             server.server_address[1], " over TLS" if ssl_context else "", len(service.config.calling_aets))
    return server


def handle_echo(event) -> int:
    return 0x0000


REJECTIONS = {
    "calling_aet": "DIMSE association refused: the calling AE title is not on the allow-list (calling_aets)",
    "called_aet": "DIMSE association refused: the called AE title is not this SCP's (--dicom-ae-title)",
    "max_associations": "DIMSE association refused: too many associations at once; retry later",
    "association": "DIMSE association refused",
}


def rejection_reason(assoc) -> str:
    """Why pynetdicom's ACSE rejected an association, re-derived from the same public settings it checked."""
    ae, requestor = assoc.ae, assoc.requestor
    allowed = [title.strip() for title in ae.require_calling_aet]
    if allowed and str(requestor.ae_title).strip() not in allowed:
        return "calling_aet"
    called = getattr(requestor.primitive, "called_ae_title", None)
    if ae.require_called_aet and called is not None and str(called).strip() != str(assoc.acceptor.ae_title).strip():
        return "called_aet"
    if len([a for a in ae.active_associations if a.is_acceptor]) > ae.maximum_associations:
        return "max_associations"
    return "association"


def handle_rejected(event, service) -> None:
    """Audited (aggregated under a flood, see core.RefusalAudit): the peer's address and why, never the AE titles
    it sent (free text from an unauthenticated peer)."""
    reason = rejection_reason(event.assoc)
    service.gateway.transport_refusals.refused("dimse", reason, event.assoc.requestor.address, REJECTIONS[reason],
                                               code="PERMISSION_DENIED" if reason != "max_associations"
                                               else "UNAVAILABLE", event="dimse.association_rejected")


def handle_store(event, service) -> int:
    """One C-STORE: the file pynetdicom streamed the instance into (or its bytes, when chunked receiving is off)
    -> PacsService.receive -> the DIMSE status. Failing to store or to audit is A700 (retryable), never C000."""
    from serving.gateway.core import GatewayError, Principal
    from serving.gateway.pacs import OUT_OF_RESOURCES

    calling = str(event.assoc.requestor.ae_title).strip()
    try:
        data = event.dataset_path
    except AttributeError:
        try:
            data = bytes(event.encoded_dataset())
        except Exception:  # noqa: BLE001 - malformed dataset from the peer
            return 0xC000
    principal = Principal(identity=f"aet:{calling}", scopes=frozenset({"predict:*"}), via="dimse")
    try:
        return service.receive(data, door="dimse", identity=calling, principal=principal).status
    except (OSError, GatewayError) as exc:  # e.g. the audit trail could not be written: refused, retryable
        log.error("DIMSE C-STORE refused with A700 (%s)", type(exc).__name__)
        return OUT_OF_RESOURCES
