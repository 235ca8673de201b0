"""The DICOMweb door: STOW-RS `POST /dicom-web/studies[/{study}]` (PS3.18 10.5) on the gateway's REST port.

`build_router(gateway)` returns the FastAPI router the gateway's app factory mounts when the PACS road is enabled
(`gateway.pacs`, a PacsService). The request is authenticated like every other REST call
(`gateway.authenticate`); the body is `multipart/related; type="application/dicom"`, parsed as a stream with
python-multipart, one part at a time, each bounded by the PACS config's max_instance_mb and written to a file on
the spool's disk as it arrives (never whole in memory). Every part goes through PacsService.receive, which answers
only once the instance is in the spool. The response is the PS3.18 Store Instances Response (application/dicom+json):
200 all stored, 202 some failed, 409 none stored, 415 wrong media type; 507 (retryable) when the spool's disk is
under its reserve or fills up, checked before the body is read.
"""

import errno
import os
import re
import uuid
from pathlib import Path
from typing import Any, Optional

# No `from __future__ import annotations` here: FastAPI reads the route's parameter annotations (Request) at runtime.
STOW_MEDIA = "application/dicom"
# PS3.18 Table 10.5.3-2 failure reasons (0x0122 refused: SOP Class not supported; 0x0124 not authorised; A700 out of
# resources; C000 cannot understand) are the DIMSE status codes the receipt already carries.


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """`multipart/related; type="application/dicom"; boundary=xyz` -> ("multipart/related", {type:..., boundary:...})."""
    parts = [part.strip() for part in re.split(r";(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", value or "")]
    params = {}
    for item in parts[1:]:
        if "=" in item:
            key, _, raw = item.partition("=")
            params[key.strip().lower()] = raw.strip().strip('"')
    return parts[0].lower() if parts else "", params


class PartTooLarge(Exception):
    pass


class MultipartCollector:
    """python-multipart callbacks -> a list of (part content type, file): each part streams into its own hidden file
    in `folder` (on the spool's disk), bounded by `limit` bytes. discard() removes the files."""

    def __init__(self, boundary: str, limit: int, folder: Path):
        from python_multipart.multipart import MultipartParser

        self.limit, self.folder = limit, Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parts: list[tuple[str, Path]] = []
        self._handle = None
        self._path: Optional[Path] = None
        self._size = 0
        self._headers: dict[str, str] = {}
        self._field = b""
        self._value = b""
        callbacks = {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": self._header_field, "on_header_value": self._header_value,
            "on_header_end": self._header_end,
        }
        self.parser = MultipartParser(boundary.encode("latin-1"), callbacks)

    def _begin(self):
        self._close()
        self._size, self._headers = 0, {}
        self._path = self.folder / f".part-{uuid.uuid4().hex}.tmp"
        self._handle = open(self._path, "wb")

    def _header_field(self, data, start, end):
        self._field += data[start:end]

    def _header_value(self, data, start, end):
        self._value += data[start:end]

    def _header_end(self):
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field, self._value = b"", b""

    def _data(self, data, start, end):
        self._size += end - start
        if self._size > self.limit:
            raise PartTooLarge()
        self._handle.write(data[start:end])

    def _end(self):
        content_type, _ = parse_content_type(self._headers.get("content-type", STOW_MEDIA))
        path = self._path
        self._close()
        self.parts.append((content_type, path))

    def _close(self):
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def feed(self, chunk: bytes) -> None:
        self.parser.write(chunk)

    def close(self) -> None:
        self.parser.finalize()

    def discard(self) -> None:
        """Remove every part file (the instances that were stored are copies in the spool by now)."""
        self._close()
        for path in [self._path] + [path for _, path in self.parts]:
            if path is not None:
                path.unlink(missing_ok=True)


def _sop_item(receipt: Any, failed: bool) -> dict:
    item = {"00081150": {"vr": "UI", "Value": [receipt.sop_class]} if receipt.sop_class else {"vr": "UI"},
            "00081155": {"vr": "UI", "Value": [receipt.sop_instance]} if receipt.sop_instance else {"vr": "UI"}}
    if failed:
        item["00081197"] = {"vr": "US", "Value": [int(receipt.status)]}
    return item


def stow_response(receipts: list[Any]) -> tuple[int, dict]:
    """Receipts -> (HTTP status, Store Instances Response body)."""
    stored = [r for r in receipts if r.status == 0x0000]
    failed = [r for r in receipts if r.status != 0x0000]
    body: dict = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [_sop_item(r, False) for r in stored]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [_sop_item(r, True) for r in failed]}
    status = 200 if not failed else (202 if stored else 409)
    return status, body


def build_router(gateway: Any, pacs: Optional[Any] = None):
    """The STOW-RS router; `pacs` defaults to `gateway.pacs` (set by the app factory when the PACS road is on)."""
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    router = APIRouter()

    from serving.gateway.core import GatewayError
    from serving.gateway.rest import error_response

    async def stow(request: Request, study: Optional[str] = None):

        service = pacs if pacs is not None else getattr(gateway, "pacs", None)
        try:  # audited by the gateway when refused
            principal = await run_in_threadpool(gateway.authenticate, request)
        except GatewayError as exc:
            return error_response(exc)
        if service is None:
            return JSONResponse({"error": "the PACS road is not enabled on this gateway (start it with "
                                          "--results-to and --pacs-config)"}, status_code=503)
        media, params = parse_content_type(request.headers.get("content-type", ""))
        if media != "multipart/related" or params.get("type", "").lower() != STOW_MEDIA or not params.get("boundary"):
            return JSONResponse({"error": 'STOW-RS takes Content-Type: multipart/related; type="application/dicom"; '
                                          "boundary=..."}, status_code=415)
        try:
            short = await run_in_threadpool(service.space_refusal, "dicomweb", principal.identity, 0)
        except GatewayError as exc:  # the refusal could not be audited (the disk is full): refused all the same
            return error_response(exc)
        if short is not None:  # before reading the body: the sender keeps its instances and retries
            return error_response(disk_full(short.reason))
        collector = MultipartCollector(params["boundary"], service.config.max_instance_mb * 2**20,
                                       service.spool.receiving)
        try:
            return await _store(request, collector, service, principal, study)
        except GatewayError as exc:  # the audit trail could not be written: refused
            return error_response(exc)
        finally:
            await run_in_threadpool(collector.discard)

    async def _store(request, collector: MultipartCollector, service, principal, study: Optional[str]):
        from serving.gateway.pacs import DISK_FULL, Receipt

        try:
            async for chunk in request.stream():
                collector.feed(chunk)
            collector.close()
        except PartTooLarge:
            service.audit({"event": "pacs.refused", "door": "dicomweb", "identity": principal.identity,
                           "reason": "too_large"})
            return JSONResponse({"error": f"an instance is over max_instance_mb={service.config.max_instance_mb}"},
                                status_code=413)
        except OSError as exc:  # the spool's disk filled up while the body streamed in
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            service.audit({"event": "pacs.refused", "door": "dicomweb", "identity": principal.identity,
                           "reason": DISK_FULL})
            return error_response(disk_full("the gateway's spool disk filled up while the body arrived"))
        except Exception:  # noqa: BLE001 - a malformed body; no detail (it could quote content)
            return JSONResponse({"error": "the multipart/related body could not be parsed"}, status_code=400)
        if not collector.parts:
            return JSONResponse({"error": "the request holds no DICOM part"}, status_code=400)
        receipts = []
        for content_type, path in collector.parts:
            if content_type != STOW_MEDIA:
                receipts.append(Receipt(0xC000, reason="part is not application/dicom"))
            elif study and not _in_study(path, study):  # PS3.18: an instance of another study is refused
                receipts.append(Receipt(0xA900, reason="instance is not in the study named by the URL"))
            else:
                receipts.append(await run_in_threadpool(service.receive, path, "dicomweb", principal.identity,
                                                        principal))
        if receipts and all(receipt.limit == DISK_FULL for receipt in receipts):
            return error_response(disk_full(receipts[0].reason))
        status, body = stow_response(receipts)
        return JSONResponse(body, status_code=status, media_type="application/dicom+json")

    router.add_api_route("/dicom-web/studies", stow, methods=["POST"], name="stow_rs")
    router.add_api_route("/dicom-web/studies/{study}", stow, methods=["POST"], name="stow_rs_study")
    return router


def disk_full(reason: str):
    """The table's answer to a full spool disk (HTTP 507, retryable; gRPC RESOURCE_EXHAUSTED)."""
    from serving.gateway.core import GatewayError
    from serving.gateway.pacs import DISK_FULL

    return GatewayError("RESOURCE_EXHAUSTED", reason, reason=DISK_FULL)


def _in_study(path: os.PathLike, study: str) -> bool:
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - unreadable: receive() would refuse it too
        return False
    return str(header.get("StudyInstanceUID", "")) == study
