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
                (evt.EVT_REJECTED, handle_rejected)]
    server = ae.start_server((host, port), block=False, evt_handlers=handlers)
    log.info("DIMSE SCP %s listening on %s:%d (%d calling AE titles allowed)", ae_title, host,
             server.server_address[1], len(service.config.calling_aets))
    return server


def handle_echo(event) -> int:
    return 0x0000


def handle_rejected(event) -> None:
    log.warning("DIMSE association from %s refused (calling AE title not on the allow-list, or wrong called AE)",
                event.assoc.requestor.address)


def handle_store(event, service) -> int:
    """One C-STORE: the instance as a DICOM file -> PacsService.receive -> the DIMSE status."""
    from serving.gateway.core import Principal

    calling = str(event.assoc.requestor.ae_title).strip()
    try:
        data = bytes(event.encoded_dataset())
    except Exception:  # noqa: BLE001 - malformed dataset from the peer
        return 0xC000
    principal = Principal(identity=f"aet:{calling}", scopes=frozenset({"predict:*"}), via="dimse")
    return service.receive(data, door="dimse", identity=calling, principal=principal).status
