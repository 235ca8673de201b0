"""Results back to the PACS: a DICOM Structured Report (TID 1500 Measurement Report in a Comprehensive 3D SR, built
with highdicom), an optional Grad-CAM Secondary Capture, a JSON webhook, and the senders (STOW-RS, C-STORE).

The SR carries one qualitative finding (the predicted class, or "outside intended use" when the model says the image
is out of distribution) with its probability, the model name and version as algorithm identification, references to
every source instance, in the source's study and in a new series. Patient and study modules are copied from the
source (the SR goes back to the same PACS) and nothing else: `evidence_headers` keeps only those modules plus the
instance UIDs the references need, so no other header value can travel into the report.

Destinations (`--results-to`): `dicomweb+http(s)://HOST:PORT/ROOT` (STOW-RS), `dimse://AET@HOST:PORT` (C-STORE) or
`dimse+tls://AET@HOST:PORT` (C-STORE over DICOM TLS: the destination's certificate checked against --results-ca and
its host name, the gateway's --tls-cert/--tls-key presented as the client certificate).
"""

from __future__ import annotations

import io
import json
import logging
import urllib.parse
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

log = logging.getLogger("medpipe.gateway.pacs")

LOCAL_SCHEME = "99MEDPIPE"  # private coding scheme for class names without a configured standard code
MANUFACTURER = "medpipe"
OUTSIDE_INTENDED_USE = "OUTSIDE-USE"  # the finding's code when the model says the image is out of distribution
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902

# PS3.3 C.7.1.1 Patient and C.7.2.1 General Study (+ C.7.2.2 Patient Study) attributes: what the SR may copy.
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDsSequence",
    "PatientAge", "PatientSize", "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "StudyDescription",
)
TYPE2_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                  "StudyDate", "StudyTime", "ReferringPhysicianName")
# What a reference to a source instance needs (PS3.3 C.17.2.1 evidence, TID 1500 image library).
REFERENCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns",
                      "FrameOfReferenceUID", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing",
                      "NumberOfFrames")


@dataclass(frozen=True)
class Finding:
    """What one result says: the class (None = outside intended use), its probability, the model that said it."""

    class_name: Optional[str]
    probability: float
    model: str
    version: int
    probabilities: dict
    ood_score: Optional[float] = None
    instances: int = 1


def aggregate(items: Sequence[Any], rule: str = "max") -> tuple[Optional[str], float, dict, Optional[float], int]:
    """Per-image results (ItemResult-like: class_name, confidence, probabilities, ood_score, in_distribution) ->
    one (class or None, probability, probabilities, ood score, index of the image that decided).

    max: each class's highest probability over the slices, then the class with the highest value ("the most
    suspicious slice decides"); mean: the mean probability per class. Any slice outside the intended use makes the
    whole result "outside intended use": a finding is never drawn from images the model should not read."""
    if not items:
        raise ValueError("no image results to aggregate")
    names = list(items[0].probabilities)
    table = np.array([[float(item.probabilities[name]) for name in names] for item in items])
    per_class = table.max(axis=0) if rule == "max" else table.mean(axis=0)
    best = int(per_class.argmax())
    decider = int(table[:, best].argmax())
    scores = [item.ood_score for item in items if item.ood_score is not None]
    ood = max(scores) if scores else None
    outside = any(item.in_distribution is False or item.class_name is None for item in items)
    probabilities = {name: float(value) for name, value in zip(names, per_class)}
    return (None if outside else names[best]), float(per_class[best]), probabilities, ood, decider


def evidence_headers(ds) -> Any:
    """A copy of a source header reduced to the patient and study modules and the reference UIDs."""
    from pydicom.dataset import Dataset
    from pydicom.valuerep import DA, TM

    out = Dataset()
    for keyword in ("SpecificCharacterSet",) + PATIENT_STUDY_KEYWORDS + REFERENCE_KEYWORDS:
        if keyword in ds:
            out[keyword] = ds[keyword]
    for keyword in TYPE2_KEYWORDS:  # type 2: present, possibly empty
        if keyword not in out:
            setattr(out, keyword, None)
    for keyword, kind in (("StudyDate", DA), ("StudyTime", TM), ("PatientBirthDate", DA)):
        try:  # a non-conformant value (old ACR-NEMA "10:52:34") would stop the SR: sent empty instead
            if out[keyword].value not in (None, ""):
                kind(out[keyword].value)
        except ValueError:
            setattr(out, keyword, None)
    return out


def _code(value: str, scheme: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:64])


def class_code(class_name: Optional[str], codes: dict):
    if class_name is None:
        return _code(OUTSIDE_INTENDED_USE, LOCAL_SCHEME, "Outside intended use")
    known = codes.get(class_name)
    if known is not None:
        return _code(known.value, known.scheme, known.meaning)
    return _code(class_name, LOCAL_SCHEME, class_name)  # over 16 characters: highdicom writes LongCodeValue


def build_sr(sources: Sequence[Any], finding: Finding, *, sr_uid: str, series_uid: str, codes: dict):
    """The Comprehensive 3D SR (TID 1500) for one study's routed instances. `sources`: full or header-only pydicom
    datasets; only `evidence_headers` of each is used. highdicom's and pydicom's validation warnings are silenced
    here: they quote header values (a patient name) into logs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _build_sr(sources, finding, sr_uid=sr_uid, series_uid=series_uid, codes=codes)


def _build_sr(sources: Sequence[Any], finding: Finding, *, sr_uid: str, series_uid: str, codes: dict):
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm

    evidence = [evidence_headers(ds) for ds in sources]
    algorithm = hd.sr.AlgorithmIdentification(name=finding.model, version=str(finding.version))
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=series_uid, name="medpipe gateway",
                                                       manufacturer_name=MANUFACTURER, model_name=finding.model)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=dcm.DCM.Device, observer_identifying_attributes=device))
    measurement = hd.sr.Measurement(
        name=_code("probability", LOCAL_SCHEME, "Probability of finding"), value=round(finding.probability, 6),
        unit=_code("1", "UCUM", "no units"), algorithm_id=algorithm)
    measurements = [measurement]
    if finding.ood_score is not None:
        measurements.append(hd.sr.Measurement(
            name=_code("ood-score", LOCAL_SCHEME, "Out-of-distribution score"), value=round(finding.ood_score, 6),
            unit=_code("1", "UCUM", "no units"), algorithm_id=algorithm))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derive(sr_uid, "tracking"),
                                                     identifier=f"{finding.model} v{finding.version}"),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=_code("121071", "DCM", "Finding"), value=class_code(finding.class_name, codes))],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in evidence],
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=_code("363679005", "SCT", "Imaging"),
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=series_uid, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_uid, instance_number=1, manufacturer=MANUFACTURER,
        series_description=f"medpipe {finding.model} v{finding.version}", is_complete=True, is_final=False,
        is_verified=False)
    return sr


def derive(uid: str, purpose: str) -> str:
    from serving.gateway.spool import derived_uid

    return derived_uid(uid, purpose)


def build_secondary_capture(source, png: bytes, heatmap: np.ndarray, *, sop_uid: str, series_uid: str):
    """The Grad-CAM overlay (the image as the model saw it, heat map in 'jet' on top) as a Secondary Capture in the
    source's study."""
    import highdicom as hd
    from PIL import Image

    from models.gradcam import overlay

    seen = np.asarray(Image.open(io.BytesIO(png)))
    heat = np.asarray(Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize(
        (seen.shape[1], seen.shape[0]), Image.BILINEAR), dtype=np.float32) / 255.0
    picture = overlay(seen, heat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # they quote header values
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=evidence_headers(source), pixel_array=picture, photometric_interpretation="RGB",
            bits_allocated=8, coordinate_system="PATIENT", patient_orientation=("L", "P"),
            series_instance_uid=series_uid, sop_instance_uid=sop_uid, series_number=SC_SERIES_NUMBER,
            instance_number=1, manufacturer=MANUFACTURER)
    # padding and resizing keep the source's row/column directions: its orientation, or empty (type 2) if unknown
    orientation = source.get("PatientOrientation")
    sc.PatientOrientation = list(orientation) if orientation and len(orientation) == 2 else None
    return sc


def to_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def webhook_payload(finding: Finding, uids: dict, job_key: str) -> dict:
    """The apps' JSON: the result and the UIDs to attach it to (UIDs are not logged; the webhook is a hospital
    endpoint configured by the operator)."""
    return {"event": "medpipe.result", "job": job_key, "model": finding.model, "version": finding.version,
            "class_name": finding.class_name, "outside_intended_use": finding.class_name is None,
            "probability": finding.probability, "probabilities": finding.probabilities,
            "ood_score": finding.ood_score, "instances": finding.instances, **uids}


# ---------------------------------------------------------------------------------------------------------------
# destinations
@dataclass(frozen=True)
class Destination:
    kind: str  # dicomweb | dimse
    url: str = ""  # dicomweb: http(s)://HOST:PORT/ROOT
    ae_title: str = ""
    host: str = ""
    port: int = 0
    tls: bool = False  # dimse+tls://
    ca: Optional[str] = None  # PEM CA that signs the destination's certificate
    cert: Optional[str] = None  # PEM client certificate presented to it (with key)
    key: Optional[str] = None

    def describe(self) -> str:
        if self.kind == "dicomweb":
            return self.url
        return f"dimse{'+tls' if self.tls else ''}://{self.ae_title}@{self.host}:{self.port}"

    def tls_context(self):
        """The client side of DICOM TLS: the destination's certificate and host name verified."""
        import ssl

        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context


class DeliveryError(Exception):
    """The destination did not take the result (retried with backoff)."""


def parse_destination(text: str, ca: Optional[str] = None, cert: Optional[str] = None,
                      key: Optional[str] = None) -> Destination:
    """`dicomweb+http(s)://HOST:PORT/ROOT`, `dimse://AET@HOST:PORT` or `dimse+tls://AET@HOST:PORT` (which needs `ca`;
    `cert`/`key` are the client certificate); anything else is a clear error."""
    from medpipe.errors import ConfigError

    if text.startswith("dimse+tls://"):
        plain = parse_destination("dimse://" + text[len("dimse+tls://"):])
        if not ca:
            raise ConfigError(f"--results-to {text!r} needs --results-ca: the PEM CA that signs the destination's "
                              "certificate (DICOM TLS checks who it sends results to)")
        return Destination("dimse", ae_title=plain.ae_title, host=plain.host, port=plain.port, tls=True, ca=ca,
                           cert=cert, key=key)

    if text.startswith(("dicomweb+http://", "dicomweb+https://")):
        url = text[len("dicomweb+"):].rstrip("/")
        if not urllib.parse.urlsplit(url).hostname:
            raise ConfigError(f"--results-to {text!r}: no host; expected dicomweb+http://HOST:PORT/ROOT")
        return Destination("dicomweb", url=url)
    if text.startswith("dimse://"):
        parts = urllib.parse.urlsplit(text)
        if not parts.username or not parts.hostname or not parts.port:
            raise ConfigError(f"--results-to {text!r}: expected dimse://AET@HOST:PORT (e.g. dimse://ORTHANC@pacs:4242)")
        return Destination("dimse", ae_title=urllib.parse.unquote(parts.username), host=parts.hostname,
                           port=parts.port)
    raise ConfigError(f"--results-to {text!r}: expected dicomweb+http(s)://HOST:PORT/ROOT (STOW-RS), "
                      f"dimse://AET@HOST:PORT (C-STORE) or dimse+tls://AET@HOST:PORT (C-STORE over TLS)")


def send(destination: Destination, objects: Sequence[bytes], timeout: float = 30.0) -> None:
    """Deliver DICOM objects; raises DeliveryError (no header value in its message)."""
    if destination.kind == "dicomweb":
        _stow(destination.url, objects, timeout)
    else:
        _c_store(destination, objects, timeout)


def _stow(url: str, objects: Sequence[bytes], timeout: float) -> None:
    from dicomweb_client.api import DICOMwebClient
    import pydicom
    import requests

    from beam_pipelines.dicomweb_source import session  # one reading of the MEDPIPE_DICOMWEB_* credentials

    client = DICOMwebClient(url=url, session=session(), timeout=timeout)
    client.set_http_retry_params(retry=False)  # the outbox retries with its own backoff; never block the sender
    datasets = [pydicom.dcmread(io.BytesIO(data)) for data in objects]
    try:
        client.store_instances(datasets=datasets)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise DeliveryError(f"STOW-RS to {url} answered HTTP {status}") from None
    except requests.RequestException as exc:
        raise DeliveryError(f"STOW-RS to {url} failed: {type(exc).__name__}") from None


def _c_store(destination: Destination, objects: Sequence[bytes], timeout: float) -> None:
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(io.BytesIO(data)) for data in objects]
    ae = AE(ae_title="MEDPIPE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    tls_args = (destination.tls_context(), destination.host) if destination.tls else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        raise DeliveryError(f"C-STORE association with {destination.describe()} was not established")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None or int(code) not in (0x0000, 0xB000, 0xB006, 0xB007):
                raise DeliveryError(f"C-STORE to {destination.describe()} answered status "
                                    f"{'none' if code is None else hex(int(code))}")
    finally:
        assoc.release()


def post_webhook(url: str, payload: dict, timeout: float = 10.0) -> None:
    import requests

    try:
        response = requests.post(url, data=json.dumps(payload), headers={"Content-Type": "application/json"},
                                 timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as exc:
        raise DeliveryError(f"webhook {urllib.parse.urlsplit(url).netloc} failed: {type(exc).__name__}") from None


def read_finding(ds) -> dict:
    """What an SR built by build_sr says, read back from the dataset (for clients, tests and the benchmark):
    {finding: code value, meaning, probability, algorithm, algorithm_version, references: [SOP Instance UIDs]}."""
    out: dict = {"references": []}

    def value(code) -> str:
        return str(code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or "")

    def walk(items):
        for item in items:
            name = value(item.ConceptNameCodeSequence[0]) if "ConceptNameCodeSequence" in item else None
            if name == "121071" and "ConceptCodeSequence" in item:
                out["finding"] = value(item.ConceptCodeSequence[0])
                out["meaning"] = str(item.ConceptCodeSequence[0].CodeMeaning)
            elif name == "probability" and "MeasuredValueSequence" in item:
                out["probability"] = float(item.MeasuredValueSequence[0].NumericValue)
            elif name == "111001":
                out["algorithm"] = str(item.TextValue)
            elif name == "111003":
                out["algorithm_version"] = str(item.TextValue)
            if "ReferencedSOPSequence" in item:
                out["references"] += [str(ref.ReferencedSOPInstanceUID) for ref in item.ReferencedSOPSequence]
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    out["references"] = sorted(set(out["references"]))
    return out
