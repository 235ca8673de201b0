"""Results back to the PACS: a DICOM Structured Report (TID 1500 Measurement Report in a Comprehensive 3D SR, built
with highdicom), an optional Grad-CAM Secondary Capture, a JSON webhook, and the senders (STOW-RS, C-STORE).

The SR carries one qualitative finding (the predicted class, or "outside intended use" when the model says the image
is out of distribution) with its probability, the model name and version as algorithm identification, references to
every source instance, in the source's study and in a new series. Patient and study modules are copied from the
source (the SR goes back to the same PACS) and nothing else: `evidence_headers` keeps only those modules plus the
instance UIDs the references need, so no other header value can travel into the report.

Destinations (`--results-to`): `dicomweb+http(s)://HOST:PORT/ROOT` (STOW-RS) or `dimse://AET@HOST:PORT` (C-STORE).
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
    """What one study result says: the class and its probability (both None = outside intended use: no finding),
    the model that said it, and which sources decided or were left out (indices into the SR's sources)."""

    class_name: Optional[str]
    probability: Optional[float]
    model: str
    version: int
    probabilities: dict
    ood_score: Optional[float] = None
    instances: int = 1
    decider: Optional[int] = None  # the image whose probabilities decided the study
    excluded: tuple = ()  # images outside intended use: listed, never given a class or probability
    rule: str = ""
    operating_point: Optional[float] = None
    abnormal: Optional[bool] = None  # abnormal_first only
    source_uids: tuple = ()  # SOP Instance UIDs of the sources, same order (webhook only; never logged)


def aggregate(items: Sequence[Any], rule) -> Any:
    """Per-image results (ItemResult-like: probabilities, in_distribution) -> medpipe.study.StudyDecision by the
    rule (medpipe.study.StudyRule): the one implementation of the study decision, shared with batch inference and
    `medpipe predict --study`. An image without probabilities (outside intended use) counts as excluded."""
    from medpipe.study import decide

    if not items:
        raise ValueError("no image results to aggregate")
    flags = [False if (item.in_distribution is False or not item.probabilities) else item.in_distribution
             for item in items]
    table = [item.probabilities or {} for item in items]
    return decide(table, flags, rule)


def finding_of(decision: Any, items: Sequence[Any], model: str, version: int, sources: Sequence[Any]) -> Finding:
    """The SR's Finding from a study decision. The OOD score shown is the highest among the images the finding was
    drawn from (all images when none was in distribution)."""
    pool = decision.included or tuple(range(len(items)))
    scores = [items[i].ood_score for i in pool if items[i].ood_score is not None]
    return Finding(decision.class_name, decision.probability, model, int(version), dict(decision.probabilities),
                   max(scores) if scores else None, len(items), decision.decider, tuple(decision.excluded),
                   decision.rule, decision.operating_point, decision.abnormal,
                   tuple(str(ds.SOPInstanceUID) for ds in sources))


def wants_secondary_capture(decision: Any) -> bool:
    """A heat map only for a finding: never for an abstention, never for a study the rule called normal."""
    if decision.class_name is None or decision.decider is None:
        return False
    return decision.abnormal is not False


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


def build_sr(sources: Sequence[Any], finding: Finding, *, sr_uid: str, series_uid: str, codes: dict,
             instance_number: int = 1, predecessor: Optional[dict] = None):
    """The Comprehensive 3D SR (TID 1500) for one study's routed instances. `sources`: full or header-only pydicom
    datasets; only `evidence_headers` of each is used. `predecessor` ({"sr_uid", "series_uid"}): the study's
    previous SR, which this one replaces (Predecessor Documents Sequence). highdicom's and pydicom's validation
    warnings are silenced here: they quote header values (a patient name) into logs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _build_sr(sources, finding, sr_uid=sr_uid, series_uid=series_uid, codes=codes,
                         instance_number=instance_number, predecessor=predecessor)


TRACKING_STUDY, TRACKING_DECIDING, TRACKING_EXCLUDED = "study finding", "deciding image", "outside intended use"
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage


def _predecessor_dataset(sources: Sequence[Any], predecessor: dict):
    """What highdicom needs to write the Predecessor Documents Sequence entry of the previous SR."""
    from pydicom.dataset import Dataset

    previous = Dataset()
    previous.StudyInstanceUID = str(sources[0].StudyInstanceUID)
    previous.SeriesInstanceUID = predecessor["series_uid"]
    previous.SOPClassUID = SR_SOP_CLASS
    previous.SOPInstanceUID = predecessor["sr_uid"]
    return previous


def _build_sr(sources: Sequence[Any], finding: Finding, *, sr_uid: str, series_uid: str, codes: dict,
              instance_number: int = 1, predecessor: Optional[dict] = None):
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm

    evidence = [evidence_headers(ds) for ds in sources]
    algorithm = hd.sr.AlgorithmIdentification(name=finding.model, version=str(finding.version))
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=series_uid, name="medpipe gateway",
                                                       manufacturer_name=MANUFACTURER, model_name=finding.model)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=dcm.DCM.Device, observer_identifying_attributes=device))
    unit = _code("1", "UCUM", "no units")
    excluded = set(finding.excluded)
    included = [i for i in range(len(evidence)) if i not in excluded]

    def group(purpose: str, members: Sequence[int], class_name: Optional[str], probability: Optional[float],
              ood: Optional[float]):
        measurements = []
        if class_name is not None and probability is not None:  # abstention: no probability of anything
            measurements.append(hd.sr.Measurement(
                name=_code("probability", LOCAL_SCHEME, "Probability of finding"), value=round(probability, 6),
                unit=unit, algorithm_id=algorithm))
        if ood is not None:
            measurements.append(hd.sr.Measurement(
                name=_code("ood-score", LOCAL_SCHEME, "Out-of-distribution score"), value=round(ood, 6), unit=unit,
                algorithm_id=algorithm))
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=derive(sr_uid, "tracking", purpose), identifier=purpose),
            algorithm_id=algorithm,
            measurements=measurements or None,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=_code("121071", "DCM", "Finding"), value=class_code(class_name, codes))],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(evidence[i]) for i in members],
        )

    # the study's finding, drawn from the in-distribution images only (all images when none is: outside use)
    groups = [group(TRACKING_STUDY, included or list(range(len(evidence))), finding.class_name, finding.probability,
                    finding.ood_score)]
    if finding.decider is not None and finding.class_name is not None:
        groups.append(group(TRACKING_DECIDING, [finding.decider], finding.class_name, finding.probability, None))
    if excluded and included:  # a mixed study lists the images it was not decided on
        groups.append(group(TRACKING_EXCLUDED, sorted(excluded), None, None, None))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=_code("363679005", "SCT", "Imaging"),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=series_uid, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_uid, instance_number=instance_number, manufacturer=MANUFACTURER,
        series_description=f"medpipe {finding.model}", is_complete=True, is_final=False,
        is_verified=False,
        previous_versions=[_predecessor_dataset(evidence, predecessor)] if predecessor else None)
    return sr


def derive(uid: str, *purpose: str) -> str:
    from serving.gateway.spool import derived_uid

    return derived_uid(uid, *purpose)


def build_secondary_capture(source, png: bytes, heatmap: np.ndarray, *, sop_uid: str, series_uid: str,
                            instance_number: int = 1):
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
            instance_number=instance_number, manufacturer=MANUFACTURER)
    # padding and resizing keep the source's row/column directions: its orientation, or empty (type 2) if unknown
    orientation = source.get("PatientOrientation")
    sc.PatientOrientation = list(orientation) if orientation and len(orientation) == 2 else None
    return sc


def to_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def webhook_payload(finding: Finding, uids: dict, job_key: str, supersedes: Optional[str] = None) -> dict:
    """The apps' JSON: the result and the UIDs to attach it to (UIDs are not logged; the webhook is a hospital
    endpoint configured by the operator). An abstention carries no class, probability or probabilities;
    `supersedes` is the SR SOP Instance UID this result replaces (null for a study's first result)."""
    outside = finding.class_name is None
    named = finding.source_uids
    return {"event": "medpipe.result", "job": job_key, "model": finding.model, "version": finding.version,
            "class_name": finding.class_name, "outside_intended_use": outside,
            "probability": None if outside else finding.probability,
            "probabilities": {} if outside else finding.probabilities,
            "ood_score": finding.ood_score, "instances": finding.instances, "rule": finding.rule,
            "operating_point": finding.operating_point, "abnormal": finding.abnormal,
            "deciding_instance": named[finding.decider] if named and finding.decider is not None else None,
            "excluded_instances": [named[i] for i in finding.excluded] if named else [],
            "supersedes": supersedes, **uids}


# ---------------------------------------------------------------------------------------------------------------
# destinations
@dataclass(frozen=True)
class Destination:
    kind: str  # dicomweb | dimse
    url: str = ""  # dicomweb: http(s)://HOST:PORT/ROOT
    ae_title: str = ""
    host: str = ""
    port: int = 0

    def describe(self) -> str:
        return self.url if self.kind == "dicomweb" else f"dimse://{self.ae_title}@{self.host}:{self.port}"


class DeliveryError(Exception):
    """The destination did not take the result (retried with backoff)."""


def parse_destination(text: str) -> Destination:
    """`dicomweb+http(s)://HOST:PORT/ROOT` or `dimse://AET@HOST:PORT`; anything else is a clear error."""
    from medpipe.errors import ConfigError

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
    raise ConfigError(f"--results-to {text!r}: expected dicomweb+http(s)://HOST:PORT/ROOT (STOW-RS) or "
                      f"dimse://AET@HOST:PORT (C-STORE)")


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
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
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
    {finding, meaning, probability (absent for an abstention), ood_score, algorithm, algorithm_version,
    references (every referenced SOP Instance UID), deciding, excluded (per purpose), predecessors, groups}."""
    out: dict = {"references": [], "deciding": [], "excluded": [], "groups": []}

    def value(code) -> str:
        return str(code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or "")

    def walk(items, into: dict):
        for item in items:
            name = value(item.ConceptNameCodeSequence[0]) if "ConceptNameCodeSequence" in item else None
            if name == "125007" and "ContentSequence" in item:  # a measurement group
                found: dict = {"references": []}
                walk(item.ContentSequence, found)
                out["groups"].append(found)
                continue
            if name == "121071" and "ConceptCodeSequence" in item:
                into["finding"] = value(item.ConceptCodeSequence[0])
                into["meaning"] = str(item.ConceptCodeSequence[0].CodeMeaning)
            elif name == "probability" and "MeasuredValueSequence" in item:
                into["probability"] = float(item.MeasuredValueSequence[0].NumericValue)
            elif name == "ood-score" and "MeasuredValueSequence" in item:
                into["ood_score"] = float(item.MeasuredValueSequence[0].NumericValue)
            elif name == "112039":
                into["tracking"] = str(item.TextValue)
            elif name == "111001":
                out["algorithm"] = str(item.TextValue)
            elif name == "111003":
                out["algorithm_version"] = str(item.TextValue)
            if "ReferencedSOPSequence" in item:
                into.setdefault("references", [])
                into["references"] += [str(ref.ReferencedSOPInstanceUID) for ref in item.ReferencedSOPSequence]
            if "ContentSequence" in item:
                walk(item.ContentSequence, into)

    walk(ds.ContentSequence, out)
    for found in out["groups"]:
        out["references"] += found.get("references", [])
        purpose = found.get("tracking")
        if purpose == TRACKING_STUDY:
            for key in ("finding", "meaning", "probability", "ood_score"):
                if key in found:
                    out[key] = found[key]
        elif purpose == TRACKING_DECIDING:
            out["deciding"] = sorted(set(found["references"]))
        elif purpose == TRACKING_EXCLUDED:
            out["excluded"] = sorted(set(found["references"]))
    out["references"] = sorted(set(out["references"]))
    out["predecessors"] = [str(ref.ReferencedSOPInstanceUID)
                           for study in ds.get("PredecessorDocumentsSequence", [])
                           for series in study.get("ReferencedSeriesSequence", [])
                           for ref in series.get("ReferencedSOPSequence", [])]
    return out
