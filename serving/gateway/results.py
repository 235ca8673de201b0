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
    # per source, same order: (class or None, probability or None, OOD score or None), each image decided alone by
    # the same rule (None class: outside intended use)
    images: tuple = ()
    ood_threshold: Optional[float] = None  # the model's OOD threshold (assets/ood.json): score above = outside use


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


def finding_of(decision: Any, items: Sequence[Any], model: str, version: int, sources: Sequence[Any],
               rule: Any = None, ood_threshold: Optional[float] = None) -> Finding:
    """The SR's Finding from a study decision. The OOD score shown is the highest among the images the finding was
    drawn from (all images when none was in distribution). With the rule, each image's own answer is kept too (its
    measurement group in the SR)."""
    pool = decision.included or tuple(range(len(items)))
    scores = [items[i].ood_score for i in pool if items[i].ood_score is not None]
    images = ()
    if rule is not None:
        def alone(item):
            if item.in_distribution is False or not item.probabilities:
                return None, None, item.ood_score
            own = aggregate([item], rule)
            return own.class_name, own.probability, item.ood_score
        images = tuple(alone(item) for item in items)
    return Finding(decision.class_name, decision.probability, model, int(version), dict(decision.probabilities),
                   max(scores) if scores else None, len(items), decision.decider, tuple(decision.excluded),
                   decision.rule, decision.operating_point, decision.abnormal,
                   tuple(str(ds.SOPInstanceUID) for ds in sources), images, ood_threshold)


def report_text(finding: Finding) -> str:
    """The TEXT item a person reads first: the finding, the intended use and that nobody has verified it."""
    if finding.class_name is None:
        said = ("Outside intended use: no image of this study looks like the images the model was trained on; "
                "no finding.")
    else:
        said = f"AI finding: {finding.class_name} (probability {finding.probability:.3f})"
        if finding.excluded:
            said += f"; {len(finding.excluded)} image(s) outside intended use were not read"
        said += "."
    return (f"{said} Model {finding.model} version {finding.version}, study rule {finding.rule or 'n/a'}. Intended "
            "use: research and quality assurance as a second reader behind a clinician. Preliminary: not verified by "
            "a physician.")


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
        value = out[keyword].value
        if value in (None, ""):
            continue
        setattr(out, keyword, normalised_date_time(str(value), kind))
    return out


def normalised_date_time(value: str, kind) -> Optional[str]:
    """A DA/TM value verbatim when valid; an old ACR-NEMA form ("10:52:34.53", "2026.11.02") without its separators
    when that makes it valid; else None (sent empty: the attributes are type 2)."""
    import re

    time_kind = kind.__name__ == "TM"
    form = _TM_FORM if time_kind else _DA_FORM  # PS3.5 6.2: pydicom also accepts the ACR-NEMA forms
    for candidate in (value.strip(), value.strip().replace(":" if time_kind else ".", "")):
        if not re.fullmatch(form, candidate):
            continue
        try:
            kind(candidate)  # calendar and clock ranges
        except ValueError:
            continue
        return candidate
    return None


_DA_FORM = r"\d{8}"
_TM_FORM = r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?"


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
             instance_number: int = 1, predecessor: Optional[dict] = None, device_uid: Optional[str] = None):
    """The Comprehensive 3D SR (TID 1500) for one study's routed instances. `sources`: full or header-only pydicom
    datasets; only `evidence_headers` of each is used. `predecessor` ({"sr_uid", "series_uid"}): the study's
    previous SR, which this one replaces (Predecessor Documents Sequence). highdicom's and pydicom's validation
    warnings are silenced here: they quote header values (a patient name) into logs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _build_sr(sources, finding, sr_uid=sr_uid, series_uid=series_uid, codes=codes,
                         instance_number=instance_number, predecessor=predecessor, device_uid=device_uid)


# tracking identifiers: the study's group; an image's group is "image N", marked with one of the two suffixes
TRACKING_STUDY, TRACKING_DECIDING, TRACKING_EXCLUDED = "study finding", "(deciding image)", "(outside intended use)"
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
              instance_number: int = 1, predecessor: Optional[dict] = None, device_uid: Optional[str] = None):
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm

    evidence = [evidence_headers(ds) for ds in sources]
    algorithm = hd.sr.AlgorithmIdentification(name=finding.model, version=str(finding.version),
                                              parameters=[f"study rule {finding.rule}"] +
                                              ([f"operating point {finding.operating_point:.6f}"]
                                               if finding.operating_point is not None else []))
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=device_uid or series_uid, name="medpipe gateway",
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
            if finding.ood_threshold is not None:
                measurements.append(hd.sr.Measurement(
                    name=_code("ood-threshold", LOCAL_SCHEME, "Out-of-distribution threshold"),
                    value=round(finding.ood_threshold, 6), unit=unit, algorithm_id=algorithm))
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
    if finding.images:  # one group per image: its own answer; the deciding one and the excluded ones marked
        for index, (own_class, own_probability, own_ood) in enumerate(finding.images):
            mark = (f" {TRACKING_DECIDING}" if index == finding.decider and finding.class_name is not None else
                    f" {TRACKING_EXCLUDED}" if index in excluded else "")
            groups.append(group(f"image {index + 1}{mark}", [index], own_class, own_probability, own_ood))
    else:
        if finding.decider is not None and finding.class_name is not None:
            groups.append(group(f"image {finding.decider + 1} {TRACKING_DECIDING}", [finding.decider],
                                finding.class_name, finding.probability, None))
        if excluded and included:  # a mixed study lists the images it was not decided on
            groups.append(group(f"images {TRACKING_EXCLUDED}", sorted(excluded), None, None, None))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=_code("363679005", "SCT", "Imaging"),
        imaging_measurements=groups,
    )
    _add_text(report, report_text(finding))
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=series_uid, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_uid, instance_number=instance_number, manufacturer=MANUFACTURER,
        series_description=f"medpipe {finding.model} AI result", is_complete=True, is_final=False,
        is_verified=False,
        previous_versions=[_predecessor_dataset(evidence, predecessor)] if predecessor else None)
    sr.CodingSchemeIdentificationSequence = [_local_scheme()]  # PS3.3 C.12.1.1.2: what 99MEDPIPE is
    return sr


def _add_text(report, text: str) -> None:
    """A TEXT content item (DCM 121106 Comment) in the study finding's group: what a person reads first."""
    import highdicom as hd

    item = hd.sr.TextContentItem(name=_code("121106", "DCM", "Comment"), value=text[:1024],
                                 relationship_type="CONTAINS")
    for container in report[0].ContentSequence:  # the Imaging Measurements container holds the groups
        for group in getattr(container, "ContentSequence", []):
            identifiers = [entry for entry in getattr(group, "ContentSequence", [])
                           if entry.ConceptNameCodeSequence[0].CodeValue == "112039"]
            if identifiers and str(identifiers[0].TextValue) == TRACKING_STUDY:
                group.ContentSequence.append(item)
                return


def _local_scheme():
    from pydicom.dataset import Dataset

    scheme = Dataset()
    scheme.CodingSchemeDesignator = LOCAL_SCHEME
    scheme.CodingSchemeName = "medpipe local codes"
    scheme.CodingSchemeResponsibleOrganization = "medpipe project"
    scheme.CodingSchemeVersion = "1"
    return scheme


def derive(uid: str, *purpose: str) -> str:
    from serving.gateway.spool import derived_uid

    return derived_uid(uid, *purpose)


HEAT_FLOOR = 0.3  # heat-map values below this are not tinted: the picture shows where the model looked, not noise
SC_LABEL = "AI heat map - not for diagnosis"
SC_MIN_WIDTH = 240  # the model's view enlarged (whole multiples) to at least this width: the label stays legible
SC_BAND = 36  # rows under the picture for the label and the colour legend


def heat_picture(seen: np.ndarray, heatmap: np.ndarray, floor: float = HEAT_FLOOR) -> np.ndarray:
    """RGB uint8: the image as the model saw it, enlarged, 'jet' heat only where the map reaches `floor`, and under it
    a band with the burned-in label "AI heat map - not for diagnosis" and a low-to-high colour legend."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    grey = seen[..., 0] if seen.ndim == 3 else seen
    height, width = grey.shape
    scale = max(1, -(-SC_MIN_WIDTH // width))
    big = (width * scale, height * scale)
    grey = np.asarray(Image.fromarray(grey.astype(np.uint8)).resize(big, Image.BILINEAR), dtype=np.float32)
    heat = np.asarray(Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize(big, Image.BILINEAR),
                      dtype=np.float32) / 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    colours = colormaps["jet"](heat)[..., :3] * 255.0
    alpha = np.where(heat >= floor, 0.45, 0.0)[..., None]
    picture = np.clip((1 - alpha) * rgb + alpha * colours, 0, 255).astype(np.uint8)
    band = Image.new("RGB", (big[0], SC_BAND), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    draw.text((4, 2), SC_LABEL, fill=(255, 255, 255))
    legend_width = big[0] - 60
    ramp = (colormaps["jet"](np.linspace(floor, 1.0, legend_width))[:, :3] * 255).astype(np.uint8)
    band.paste(Image.fromarray(np.repeat(ramp[None], 8, axis=0)), (30, 20))
    draw.text((4, 18), "low", fill=(255, 255, 255))
    draw.text((big[0] - 28, 18), "high", fill=(255, 255, 255))
    return np.concatenate([picture, np.asarray(band)], axis=0)


def build_secondary_capture(source, png: bytes, heatmap: np.ndarray, *, sop_uid: str, series_uid: str,
                            instance_number: int = 1):
    """The Grad-CAM heat map of the deciding image (`heat_picture`) as a Secondary Capture in the source's study: its
    source image referenced, labelled "not for diagnosis" in the pixels and the series description. Made for abnormal
    findings only (`wants_secondary_capture`)."""
    import highdicom as hd
    from PIL import Image
    from pydicom.dataset import Dataset

    seen = np.asarray(Image.open(io.BytesIO(png)))
    picture = heat_picture(seen, np.asarray(heatmap, dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # they quote header values
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=evidence_headers(source), pixel_array=picture, photometric_interpretation="RGB",
            bits_allocated=8, coordinate_system="PATIENT", patient_orientation=("L", "P"),
            series_instance_uid=series_uid, sop_instance_uid=sop_uid, series_number=SC_SERIES_NUMBER,
            instance_number=instance_number, manufacturer=MANUFACTURER,
            series_description=f"medpipe {SC_LABEL}")
    # padding and resizing keep the source's row/column directions: its orientation, or empty (type 2) if unknown
    orientation = source.get("PatientOrientation")
    sc.PatientOrientation = list(orientation) if orientation and len(orientation) == 2 else None
    sc.Laterality = source.get("Laterality") or None  # type 2C (General Series): present, empty when unknown
    sc.BurnedInAnnotation = "YES"  # the label is in the pixels
    sc.ImageComments = SC_LABEL
    reference = Dataset()
    reference.ReferencedSOPClassUID = str(source.SOPClassUID)
    reference.ReferencedSOPInstanceUID = str(source.SOPInstanceUID)
    sc.SourceImageSequence = [reference]
    sc.DerivationDescription = "Grad-CAM heat map of the AI model over the image as the model saw it"
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
            elif name == "ood-threshold" and "MeasuredValueSequence" in item:
                into["ood_threshold"] = float(item.MeasuredValueSequence[0].NumericValue)
            elif name == "121106":
                into["text"] = str(item.TextValue)
            elif name == "112039":
                into["tracking"] = str(item.TextValue)
            elif name == "121012":
                out["device_uid"] = str(item.UID)
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
            for key in ("finding", "meaning", "probability", "ood_score", "ood_threshold", "text"):
                if key in found:
                    out[key] = found[key]
        elif purpose and purpose.endswith(TRACKING_DECIDING):
            out["deciding"] = sorted(set(out["deciding"]) | set(found["references"]))
        elif purpose and purpose.endswith(TRACKING_EXCLUDED):
            out["excluded"] = sorted(set(out["excluded"]) | set(found["references"]))
    out["references"] = sorted(set(out["references"]))
    out["predecessors"] = [str(ref.ReferencedSOPInstanceUID)
                           for study in ds.get("PredecessorDocumentsSequence", [])
                           for series in study.get("ReferencedSeriesSequence", [])
                           for ref in series.get("ReferencedSOPSequence", [])]
    return out
