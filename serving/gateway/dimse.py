"""The DIMSE door: a C-STORE and C-ECHO SCP (pynetdicom) for `medpipe gateway --dicom-port N --dicom-ae-title T`.

- Calling AE titles must be on the PACS config's allow-list (`calling_aets`); with an empty list the SCP refuses to
  start (nothing is reachable without an explicit decision), and an unknown caller's association is rejected.
- Storage contexts: every storage SOP class pynetdicom knows, with the transfer syntaxes whose pixel data
  medpipe.imaging can decode here (pydicom's decoders that are available with the installed plugins), so an
  instance is never accepted in an encoding the model's preprocessing would then refuse.
- A C-STORE is answered only after the instance is on disk (PacsService.receive -> Spool.put, fsync'd): 0x0000;
  A700 when it could not be stored (the sender retries), C000 when it is not a usable DICOM instance.
"""

from __future__ import annotations

import logging
from typing import Any

from medpipe.errors import ConfigError
from serving.gateway.audit import AuditUnavailable

log = logging.getLogger("medpipe.gateway.dimse")

VERIFICATION = "1.2.840.10008.1.1"


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
    ae.maximum_pdu_size = 0  # no limit: large instances in few PDUs
    syntaxes = decodable_transfer_syntaxes()
    for context in StoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    ae.add_supported_context(VERIFICATION)
    return ae


def start_scp(service: Any, port: int, ae_title: str = "MEDPIPE", host: str = "0.0.0.0"):
    """Start the SCP in background threads; returns the pynetdicom server (`.shutdown()` stops it)."""
    from pynetdicom import evt

    ae = build_ae(service, ae_title, service.config.calling_aets)
    handlers = [(evt.EVT_C_STORE, handle_store, [service]), (evt.EVT_C_ECHO, handle_echo),
                (evt.EVT_REJECTED, handle_rejected, [service])]
    server = ae.start_server((host, port), block=False, evt_handlers=handlers)
    log.info("DIMSE SCP %s listening on %s:%d (%d calling AE titles allowed)", ae_title, host,
             server.server_address[1], len(service.config.calling_aets))
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
    """One C-STORE: the instance as a DICOM file -> PacsService.receive -> the DIMSE status."""
    from serving.gateway.core import Principal

    calling = str(event.assoc.requestor.ae_title).strip()
    try:
        data = bytes(event.encoded_dataset())
    except Exception:  # noqa: BLE001 - malformed dataset from the peer
        return 0xC000
    principal = Principal(identity=f"aet:{calling}", scopes=frozenset({"predict:*"}), via="dimse")
    try:
        return service.receive(data, door="dimse", identity=calling, principal=principal).status
    except AuditUnavailable:
        return 0xA700  # out of resources: the sender retries once the audit trail can be written again
