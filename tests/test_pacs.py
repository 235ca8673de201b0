"""The PACS road's pure parts: routing config, the durable spool, aggregation, the SR and SC builders, STOW-RS
parsing and answers, destinations. No sockets here (tests/test_pacs_e2e.py runs the whole road)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

import fixtures_adversarial as fa
from medpipe.errors import ConfigError
from serving.gateway import results
from serving.gateway.dicomweb import MultipartCollector, parse_content_type, stow_response
from serving.gateway.pacs_config import (RoutingKeys, load_pacs_config, models_for, route_matches, routing_keys)
from serving.gateway.spool import Spool, derived_uid, idempotency_key, key_of, read_job

ROOT = Path(__file__).resolve().parent.parent
MR = "1.2.840.10008.5.1.4.1.1.4"


def write_yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_the_example_config_loads_and_routes_brain_mr_only():
    config = load_pacs_config(str(ROOT / "config" / "pacs.yaml"))
    assert config.calling_aets == ("ORTHANC",) and config.aggregation == "model"  # the model's own study rule
    assert (config.reserve_mb, config.quarantine_after) == (512, 3)
    assert models_for(config.routes, RoutingKeys("MR", "BRAIN", MR, "T1 axial")) == ["brain_mri"]
    assert models_for(config.routes, RoutingKeys("CT", "HEAD", "1.2.840.10008.5.1.4.1.1.2", "")) == []
    assert models_for(config.routes, RoutingKeys("MR", "", "1.2.840.10008.5.1.4.1.1.7", "")) == []  # SC: not routed


def test_route_criteria_and_series_pattern(tmp_path):
    config = load_pacs_config(write_yaml(tmp_path / "p.yaml", """
routes:
  - model: brain_mri
    modalities: [mr]
    body_parts: [BRAIN, HEAD]
    series_description: "t1|flair"
  - model: chest
    modalities: [CR, DX]
    codes: {PNEUMONIA: [SCT, "233604007", Pneumonia]}
"""))
    brain, chest = config.routes
    assert route_matches(brain, RoutingKeys("MR", "HEAD", MR, "Ax T1 post"))
    assert not route_matches(brain, RoutingKeys("MR", "HEAD", MR, "DWI"))  # pattern
    assert not route_matches(brain, RoutingKeys("MR", "KNEE", MR, "T1"))  # body part
    assert chest.codes["PNEUMONIA"].meaning == "Pneumonia"
    ds = pydicom.Dataset()
    ds.Modality, ds.BodyPartExamined, ds.SOPClassUID, ds.SeriesDescription = "DX", "CHEST", "1.2", "PA"
    assert models_for(config.routes, routing_keys(ds)) == ["chest"]


@pytest.mark.parametrize("text, message", [
    ("routes: [{model: m, colour: red}]", "unknown key routes"),
    ("stable_seconds: soon", "stable_seconds must be a number"),
    ("aggregation: median", "aggregation is 'median'"),
    ("routes: [{model: m, series_description: '(('}]", "not a regular expression"),
    ("routes: [{model: m, codes: {a: [SCT, 1]}}]", "must be [scheme, value, meaning]"),
    ("quarantine_after: 0", "quarantine_after must be at least 1"),
    ("reserve_mb: -5", "reserve_mb must be 0 or more"),
])
def test_config_mistakes_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_pacs_config(write_yaml(tmp_path / "p.yaml", text))


# ---- spool ---------------------------------------------------------------------------------------------------------
def test_spool_groups_by_study_waits_for_stability_and_keeps_late_arrivals(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.put("brain_mri", "1.2.3", "1.2.3.1", "1.2.3.1.1", b"first", "dimse", "ORTHANC")
    spool.put("brain_mri", "1.2.3", "1.2.3.1", "1.2.3.1.2", b"second", "dimse", "ORTHANC")
    spool.put("brain_mri", "9.9", "9.9.1", "9.9.1.1", b"other", "dicomweb", "dr-x", via="jwt")
    studies = spool.studies()
    assert sorted(len(s.instances) for s in studies) == [1, 2]
    newest = max(s.newest for s in studies)
    assert spool.stable(5.0, now=newest + 1) == []
    ready = spool.stable(5.0, now=newest + 5)
    assert len(ready) == 2 and spool.pending_instances() == 3
    # no UID on disk as a name; the sidecar has no header value
    names = [p.name for p in (tmp_path / "spool").rglob("*")]
    assert not any("1.2.3" in name or "9.9" in name for name in names)
    study = next(s for s in ready if len(s.instances) == 2)
    assert study.instances[0].meta["door"] == "dimse" and set(study.instances[0].meta) == {
        "door", "identity", "via", "series_key", "received"}
    spool.put("brain_mri", "1.2.3", "1.2.3.1", "1.2.3.1.3", b"late", "dimse", "ORTHANC")  # while processing
    spool.finish(study.instances)
    left = [s for s in spool.studies() if s.study_key == key_of("1.2.3")]
    assert [i.read() for i in left[0].instances] == [b"late"]


def test_outbox_job_replaces_itself_and_done_markers_are_per_version(tmp_path):
    spool = Spool(tmp_path / "spool")
    key = key_of("brain_mri", "3", "1.2.3.1.1")
    spool.add_job(key, {"sr.dcm": b"one"}, {"model": "brain_mri"})
    spool.add_job(key, {"sr.dcm": b"two"}, {"model": "brain_mri"})  # a replay: the same job, once
    (job,) = spool.jobs()
    assert (job / "sr.dcm").read_bytes() == b"two" and read_job(job)["objects"] == ["sr.dcm"]
    assert spool.outbox_length() == 1
    spool.mark_done([idempotency_key("1.2.3.1.1", "brain_mri", 3)])
    assert spool.is_done(idempotency_key("1.2.3.1.1", "brain_mri", 3))
    assert not spool.is_done(idempotency_key("1.2.3.1.1", "brain_mri", 4))  # a new version answers again
    (tmp_path / "spool" / "outbox" / ".half.tmp").mkdir()
    spool.clean_temporaries()
    assert not (tmp_path / "spool" / "outbox" / ".half.tmp").exists()
    spool.remove_job(job)
    assert spool.jobs() == []


def test_derived_uids_are_valid_stable_and_distinct():
    from pydicom.uid import UID

    first = derived_uid("job", "sr")
    assert first == derived_uid("job", "sr") != derived_uid("job", "sc")
    assert UID(first).is_valid and len(first) <= 64


# ---- aggregation and the SR ------------------------------------------------------------------------------------
def item(probs: dict, inside=True, ood=None):
    name = max(probs, key=probs.get)
    return SimpleNamespace(class_name=name if inside is not False else None, confidence=probs[name],
                           probabilities=probs, ood_score=ood, in_distribution=inside, heatmap=None, png=b"")


def test_aggregation_max_mean_by_name_and_outside_intended_use_excluded():
    from medpipe.study import explicit_rule

    slices = [item({"a": 0.6, "b": 0.4}), item({"a": 0.2, "b": 0.8}), item({"a": 0.9, "b": 0.1})]
    decided = results.aggregate(slices, explicit_rule("max", ["a", "b"]))
    assert (decided.class_name, decided.probability, decided.decider) == ("a", pytest.approx(0.9), 2)
    mean = results.aggregate(slices, explicit_rule("mean", ["a", "b"]))
    assert mean.class_name == "a" and mean.probability == pytest.approx(1.7 / 3)
    assert mean.probabilities["b"] == pytest.approx(1.3 / 3)
    assert results.aggregate(slices[:2], explicit_rule("max", ["a", "b"])).class_name == "b"
    # an image outside intended use is left out (listed), the others decide
    mixed = results.aggregate(slices[:2] + [item({"a": 0.99, "b": 0.01}, inside=False, ood=7.5)],
                              explicit_rule("max", ["a", "b"]))
    assert mixed.class_name == "b" and mixed.excluded == (2,)


@pytest.fixture
def phi_mr(tmp_path) -> tuple[pydicom.Dataset, list[str]]:
    path = tmp_path / "phi.dcm"
    planted = fa.mr_dicom_from_jpeg(fa.sample_jpegs("glioma", 1)[0], path, study_uid="2.25.123", series_uid="2.25.1231",
                                    sop_uid="2.25.12311", accession="PHIZQX-ACC-9")
    return pydicom.dcmread(path), planted


def test_sr_is_tid1500_in_the_source_study_with_patient_and_study_modules_only(phi_mr):
    source, planted = phi_mr
    finding = results.Finding("glioma", 0.87654321, "brain_mri", 1700000000, {"glioma": 0.87654321}, None, 1)
    sr = results.build_sr([source], finding, sr_uid=derived_uid("j", "sr"), series_uid=derived_uid("s"), codes={})
    back = pydicom.dcmread(io.BytesIO(results.to_bytes(sr)))
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert back.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.Modality == "SR" and back.SOPInstanceUID == derived_uid("j", "sr")
    said = results.read_finding(back)
    assert {key: said[key] for key in ("finding", "meaning", "probability", "algorithm", "algorithm_version",
                                       "references", "excluded", "predecessors")} == {
        "finding": "glioma", "meaning": "glioma", "probability": pytest.approx(0.876543), "algorithm": "brain_mri",
        "algorithm_version": "1700000000", "references": [str(source.SOPInstanceUID)], "excluded": [],
        "predecessors": []}
    # the patient and study modules travel (the SR returns to the same PACS) ...
    assert back.PatientID == source.PatientID and back.AccessionNumber == "PHIZQX-ACC-9"
    # ... and no other header value of the source does
    text = str(back)
    for keyword in ("InstitutionName", "OperatorsName", "StationName", "DeviceSerialNumber", "ImageComments",
                    "PerformingPhysicianName", "AdditionalPatientHistory", "PatientAddress", "SeriesDescription"):
        assert str(source.data_element(keyword).value) not in text, keyword
    assert "PHIZQX private value" not in text


def read_back(sr) -> dict:
    return results.read_finding(pydicom.dcmread(io.BytesIO(results.to_bytes(sr))))


def test_sr_outside_intended_use_and_configured_codes(phi_mr):
    from serving.gateway.pacs_config import Code

    source, _ = phi_mr
    outside = results.Finding(None, 0.55, "brain_mri", 2, {"glioma": 0.55}, 9.1, 1)
    sr = results.build_sr([source], outside, sr_uid="2.25.1", series_uid="2.25.2", codes={})
    said = read_back(sr)
    assert said["finding"] == results.OUTSIDE_INTENDED_USE and said["meaning"] == "Outside intended use"
    assert "probability" not in said and said["ood_score"] == pytest.approx(9.1)  # no probability of anything
    coded = results.Finding("glioma", 0.9, "brain_mri", 2, {"glioma": 0.9}, None, 1)
    sr = results.build_sr([source], coded, sr_uid="2.25.3", series_uid="2.25.2",
                          codes={"glioma": Code("SCT", "123", "Glioma")})
    assert read_back(sr)["finding"] == "123"


def test_sr_survives_non_conformant_source_dates_and_sc_overlay_builds(tmp_path):
    from medpipe.config import load_config
    from medpipe.imaging import preprocess_bytes

    data = (fa.SAMPLE_DICOM / "CT-MONO2-16-brain.dcm").read_bytes()  # StudyTime "10:52:34.530000" (ACR-NEMA)
    source = pydicom.dcmread(io.BytesIO(data))
    finding = results.Finding("notumor", 0.6, "m", 1, {"notumor": 0.6}, None, 1)
    # normalised where not valid ("10:52:34.530000" -> "105234.530000"), verbatim where valid
    assert results.build_sr([source], finding, sr_uid="2.25.9", series_uid="2.25.8", codes={}).StudyTime == \
        "105234.530000"
    assert results.normalised_date_time("101500", __import__("pydicom").valuerep.TM) == "101500"
    assert results.normalised_date_time("2026.11.02", __import__("pydicom").valuerep.DA) == "20261102"
    assert results.normalised_date_time("yesterday", __import__("pydicom").valuerep.DA) is None
    png = preprocess_bytes(data, load_config(str(ROOT / "config" / "brain_mri.yaml"), ["image.size=64"])).png
    sc = results.build_secondary_capture(source, png, np.linspace(0, 1, 64 * 64).reshape(64, 64),
                                         sop_uid="2.25.7", series_uid="2.25.6")
    back = pydicom.dcmread(io.BytesIO(results.to_bytes(sc)))
    # the model's 64 px view enlarged x4 to fit the burned-in label, with the label and legend band under it
    assert back.pixel_array.shape == (256 + results.SC_BAND, 256, 3)
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert back.BurnedInAnnotation == "YES" and "not for diagnosis" in back.SeriesDescription
    band = back.pixel_array[256:]
    assert band[2:14, :200].max() >= 250  # the white label text is in the pixels
    picture = back.pixel_array[:256].astype(int)
    top = picture[:40]  # heat 0..0.15 there: below the floor, so grey (R = G = B)
    assert (top[..., 0] == top[..., 1]).all() and (top[..., 1] == top[..., 2]).all()
    bottom = picture[-40:]  # heat near 1: tinted
    assert (bottom[..., 0] != bottom[..., 2]).mean() > 0.9


# ---- STOW-RS parsing and answers ---------------------------------------------------------------------------------
def multipart(parts: list[tuple[str, bytes]], boundary: str = "medpipe-test-boundary") -> bytes:
    body = b""
    for content_type, data in parts:
        body += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def test_stow_body_parses_in_chunks_into_files_and_bounds_each_part(tmp_path):
    media, params = parse_content_type('multipart/related; type="application/dicom"; boundary="b=1;x"')
    assert media == "multipart/related" and params == {"type": "application/dicom", "boundary": "b=1;x"}
    dicom = (fa.SAMPLE_DICOM / "MR2_J2KI.dcm").read_bytes()
    body = multipart([("application/dicom", dicom), ("application/dicom", b"DICM" * 10)])
    collector = MultipartCollector("medpipe-test-boundary", limit=len(dicom), folder=tmp_path / "parts")
    for start in range(0, len(body), 1000):
        collector.feed(body[start:start + 1000])
    collector.close()
    assert [(t, p.stat().st_size) for t, p in collector.parts] == [("application/dicom", len(dicom)),
                                                                    ("application/dicom", 40)]
    assert collector.parts[0][1].read_bytes() == dicom
    collector.discard()
    assert list((tmp_path / "parts").iterdir()) == []
    from serving.gateway.dicomweb import PartTooLarge

    small = MultipartCollector("medpipe-test-boundary", limit=100, folder=tmp_path / "parts")
    with pytest.raises(PartTooLarge):
        small.feed(body)
    small.discard()
    assert list((tmp_path / "parts").iterdir()) == []


def test_stow_response_statuses():
    from serving.gateway.pacs import Receipt

    ok = Receipt(0, ("brain_mri",), "", "1.2.840.10008.5.1.4.1.1.4", "1.2.3")
    bad = Receipt(0xC000, reason="unreadable")
    assert stow_response([ok])[0] == 200 and stow_response([ok, bad])[0] == 202 and stow_response([bad])[0] == 409
    status, body = stow_response([ok, bad])
    assert body["00081199"]["Value"][0]["00081155"]["Value"] == ["1.2.3"]
    assert body["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    json.dumps(body)


def test_destinations_parse_or_say_what_is_expected():
    web = results.parse_destination("dicomweb+https://pacs.example:8443/dicom-web/")
    assert (web.kind, web.url) == ("dicomweb", "https://pacs.example:8443/dicom-web")
    dimse = results.parse_destination("dimse://ORTHANC@10.0.0.5:4242")
    assert (dimse.kind, dimse.ae_title, dimse.host, dimse.port) == ("dimse", "ORTHANC", "10.0.0.5", 4242)
    for bad in ("http://pacs/dicom-web", "dimse://pacs:4242", "dicomweb+http:///x"):
        with pytest.raises(ConfigError, match="--results-to"):
            results.parse_destination(bad)


# ---- STOW-RS through the gateway's app: authenticated and scoped like every REST call ----------------------------
def test_stow_rs_is_authenticated_scoped_and_spools_before_answering(tmp_path, monkeypatch):
    """The real app (build_app + this router) and PacsService over a spool; no model is called here (nothing gets
    stable within the test), so the upstream address is never dialled."""
    from argparse import Namespace

    from fastapi.testclient import TestClient

    from gateway_support import make_pki, token
    from serving.gateway.core import Gateway
    from serving.gateway.pacs import PacsService
    from serving.gateway.pacs_config import PacsConfig, Route
    from serving.gateway.rest import build_app

    pki = make_pki(tmp_path / "pki")
    options = Namespace(upstream="127.0.0.1:9", audit_log=str(tmp_path / "audit.jsonl"), jwt_key=str(pki["jwt_public"]),
                        allow_anonymous=False, config=None, request_log=None, drift_baseline=None,
                        model_repository=None, upstream_ca=None, upstream_cert=None, upstream_key=None)
    gateway = Gateway(options)
    config = PacsConfig(spool=str(tmp_path / "spool"), stable_seconds=3600, routes=(Route("brain_mri", ("MR",)),))
    gateway.pacs = PacsService(gateway, config, results.parse_destination("dicomweb+http://127.0.0.1:9/x"),
                               b"a-test-key-of-enough-length")
    client = TestClient(build_app(gateway))
    mr = tmp_path / "mr.dcm"
    fa.mr_dicom_from_jpeg(fa.sample_jpegs("glioma", 1)[0], mr, study_uid="2.25.77", series_uid="2.25.771",
                          sop_uid="2.25.7711")
    body = multipart([("application/dicom", mr.read_bytes()),
                      ("application/dicom", (fa.SAMPLE_DICOM / "CT-MONO2-16-brain.dcm").read_bytes())])
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=medpipe-test-boundary'}
    assert client.post("/dicom-web/studies", content=body, headers=headers).status_code == 401
    other = {**headers, "Authorization": f"Bearer {token(pki['jwt_private'], scope='predict:chest')}"}
    refused = client.post("/dicom-web/studies", content=body, headers=other)
    assert refused.status_code == 202  # the CT is not routed (stored = acknowledged); the MR is not theirs to send
    assert refused.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0124]
    assert gateway.pacs.spool.pending_instances() == 0
    allowed = {**headers, "Authorization": f"Bearer {token(pki['jwt_private'], scope='predict:brain_mri')}"}
    stored = client.post("/dicom-web/studies", content=body, headers=allowed)
    assert stored.status_code == 200 and len(stored.json()["00081199"]["Value"]) == 2
    assert gateway.pacs.spool.pending_instances() == 1  # on disk before the 200
    wrong = client.post("/dicom-web/studies", content=body, headers={**allowed, "Content-Type": "application/dicom"})
    assert wrong.status_code == 415
    in_study = client.post("/dicom-web/studies/2.25.99", content=body, headers=allowed)
    assert in_study.status_code == 409  # neither instance belongs to the study named in the URL
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    received = [r for r in audit if r["event"] == "pacs.received"]
    assert [r["outcome"] for r in received] == ["permission_denied", "not routed", "spooled", "not routed"]
    assert {r["via"] for r in received} == {"jwt"} and {r["door"] for r in received} == {"dicomweb"}
    assert "2.25.7711" not in (tmp_path / "audit.jsonl").read_text()
    gateway.close()


# ---- the senders against a real PACS -----------------------------------------------------------------------------
def test_results_reach_orthanc_by_c_store_and_by_stow_rs_and_a_dead_destination_is_an_error(tmp_path):
    from orthanc import OrthancServer
    from pacs_support import srs_in

    source = pydicom.dcmread(fa.SAMPLE_DICOM / "MR2_J2KI.dcm")
    finding = results.Finding("glioma", 0.9, "brain_mri", 5, {"glioma": 0.9}, None, 1)
    objects = {uid: results.to_bytes(results.build_sr([source], finding, sr_uid=uid, series_uid="2.25.55", codes={}))
               for uid in ("2.25.501", "2.25.502")}
    with OrthancServer(tmp_path / "orthanc") as pacs:
        results.send(results.parse_destination(f"dimse://{pacs.aet}@127.0.0.1:{pacs.dicom_port}"),
                     [objects["2.25.501"]])
        results.send(results.parse_destination(f"dicomweb+{pacs.dicomweb}"), [objects["2.25.502"]])
        results.send(results.parse_destination(f"dicomweb+{pacs.dicomweb}"), [objects["2.25.502"]])  # a re-send
        stored = sorted(item["00080018"]["Value"][0] for item in srs_in(pacs, str(source.StudyInstanceUID)))
        assert stored == ["2.25.501", "2.25.502"]  # the same SOP Instance UID twice is one object
    for destination in (f"dimse://{pacs.aet}@127.0.0.1:{pacs.dicom_port}", f"dicomweb+{pacs.dicomweb}"):
        with pytest.raises(results.DeliveryError) as failed:
            results.send(results.parse_destination(destination), [objects["2.25.501"]], timeout=5)
        assert "2.25" not in str(failed.value)  # no UID in the message that goes to the log
