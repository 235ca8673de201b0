"""Study answers a radiologist can trust (issue 28), end to end on real parts: Debian's Orthanc (destination PACS),
`medpipe serve` with the SHIPPED brain MRI model (models/shipped, whose assets carry the study rule), and
`medpipe gateway` with its DIMSE SCP. Series are built from the real brain MRI JPEGs of sample_data/ (the slices
below were picked because the shipped model, reading them as MR DICOMs, calls the tumour slices clearly abnormal
and the normal ones clearly normal; the chest X-ray is flagged out of distribution).

(a) one glioma slice among six normal slices of one series -> an SR naming a tumour class, that slice deciding;
(b) a late series -> a second SR in the same series, InstanceNumber 2, Predecessor Documents Sequence naming the
    first, the whole study re-scored; the webhook says `supersedes`;
(c) an image outside intended use (a chest X-ray sent as MR) -> an SR with no probability item and no SC;
(d) dciodvfy (Debian dicom3tools) reports no error on any SR or SC the PACS received;
and the same rule in `medpipe predict --study` and batch inference (`studies.jsonl`).
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pydicom
import pytest

import fixtures_adversarial as fa
from conftest import TEST_DEID_KEY, run_module
from orthanc import OrthancServer
from pacs_support import GatewayProcess, WebhookReceiver, c_store, sr_finding, srs_in, wait_for_srs
from test_serving import start_server, stop_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
NORMALS = fa.sample_jpegs("notumor", 9)
GLIOMA = fa.SAMPLE_MRI / "glioma" / "Tr-gl_0960.jpg"  # as MR DICOM: 1 - P(notumor) = 0.977 with the shipped model
LATE_GLIOMA = fa.SAMPLE_MRI / "glioma" / "Tr-gl_0760.jpg"  # 0.974
CHEST = sorted((ROOT / "sample_data" / "chest_xray" / "NORMAL").iterdir())[0]


@pytest.fixture(scope="module")
def road(tmp_path_factory):
    root = tmp_path_factory.mktemp("study_road")
    repo = root / "repo"
    shutil.copytree(ROOT / "models" / "shipped", repo)
    config_file = repo / "models.config"  # its base_path is the compose mount point: here, the copy
    config_file.write_text(config_file.read_text().replace('"/models/brain_mri"', f'"{repo / "brain_mri"}"'))
    serve, grpc, _ = start_server(repo, root)
    pacs = OrthancServer(root / "orthanc").start()
    webhook = WebhookReceiver()
    config = root / "pacs.yaml"
    config.write_text(f"""spool: {root / "spool"}
webhook: {webhook.url}
calling_aets: [MEDPIPETEST]
stable_seconds: 1.5
scan_seconds: 0.2
secondary_capture: true
retry: {{initial_seconds: 0.5, max_seconds: 2}}
routes:
  - model: brain_mri
    modalities: [MR]
""")
    gateway = GatewayProcess(root, ["--upstream", grpc, "--allow-anonymous", "--audit-log", str(root / "audit.jsonl"),
                                    "--model-repository", str(repo), "--results-to", f"dicomweb+{pacs.dicomweb}",
                                    "--pacs-config", str(config)],
                             env={"MEDPIPE_DEID_KEY": TEST_DEID_KEY})
    try:
        gateway.start()
        yield {"root": root, "pacs": pacs, "gateway": gateway, "webhook": webhook.received, "grpc": grpc,
               "repo": repo}
    finally:
        webhook.close()
        gateway.kill()
        stop_server(serve)
        pacs.stop()


def series(road, study: str, number: int, jpegs: list[Path]) -> list[Path]:
    folder = road["root"] / "inputs" / f"{study[-8:]}-{number}"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index, source in enumerate(jpegs):
        path = folder / f"{index:03d}.dcm"
        fa.mr_dicom_from_jpeg(source, path, study_uid=study, series_uid=f"{study}.{number}",
                              sop_uid=f"{study}.{number}.{index + 1}", instance_number=index + 1)
        files.append(path)
    return files


def instances_of_class(pacs, study: str, sop_class: str) -> list[dict]:
    found = pacs.qido(f"/studies/{study}/instances")
    return [item for item in found if item["00080016"]["Value"][0] == sop_class]


def wait_for_sr_count(pacs, study: str, count: int, timeout: float = 120.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = srs_in(pacs, study)
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} SRs for the study within {timeout:.0f} s")


def dciodvfy_errors(pacs, item: dict, folder: Path) -> list[str]:
    """Debian dicom3tools' dciodvfy on the object as the PACS stored it: its Error lines (warnings allowed)."""
    import subprocess

    from dicomweb_client.api import DICOMwebClient

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed: run scripts/install_system_deps.sh")
    uid = [item[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018")]
    path = folder / f"{uid[2]}.dcm"
    DICOMwebClient(url=pacs.dicomweb).retrieve_instance(*uid).save_as(path, enforce_file_format=True)
    checked = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_a_one_glioma_slice_among_six_normal_slices_decides_the_study(road):
    pacs, gateway = road["pacs"], road["gateway"]
    study = f"2.25.{uuid.uuid4().int}"
    files = series(road, study, 1, NORMALS[:3] + [GLIOMA] + NORMALS[3:6])
    assert c_store(gateway.dicom_port, files) == [0] * 7
    wait_for_srs(pacs, [study], timeout=120)
    time.sleep(3 * 1.5)  # longer than the stability window: a second SR would exist by now
    (sr,) = srs_in(pacs, study)
    said = sr_finding(pacs, sr)
    assert said["finding"] == "glioma" and said["probability"] > 0.5  # a tumour class, never outvoted
    assert said["deciding"] == [uid_of(files[3])]  # the glioma slice decided
    assert said["references"] == sorted(uid_of(f) for f in files) and said["predecessors"] == []
    (sc,) = instances_of_class(pacs, study, SC_CLASS)  # the heat map of the deciding slice
    assert said["text"].startswith("AI finding: glioma") and "not verified by a physician" in said["text"]
    assert said["ood_threshold"] > said["ood_score"]  # the score with the threshold it is compared with
    image_groups = [g for g in said["groups"] if g.get("tracking", "").startswith("image ")]
    assert len(image_groups) == 7  # one measurement group per image, its own class and probability
    assert dciodvfy_errors(pacs, sr, road["root"]) == [] and dciodvfy_errors(pacs, sc, road["root"]) == []
    (hook,) = [h for h in road["webhook"] if h["StudyInstanceUID"] == study]
    assert hook["class_name"] == "glioma" and hook["rule"] == "abnormal_first" and hook["abnormal"] is True
    assert hook["deciding_instance"] == uid_of(files[3]) and hook["supersedes"] is None


def test_b_a_late_series_re_scores_the_study_into_a_superseding_sr(road):
    pacs, gateway = road["pacs"], road["gateway"]
    study = f"2.25.{uuid.uuid4().int}"
    first_files = series(road, study, 1, NORMALS[6:9])
    assert c_store(gateway.dicom_port, first_files) == [0] * 3
    (first,) = wait_for_sr_count(pacs, study, 1)
    first_said = sr_finding(pacs, first)
    assert first_said["finding"] == "notumor"
    late_files = series(road, study, 2, [LATE_GLIOMA])
    assert c_store(gateway.dicom_port, late_files) == [0]
    srs = wait_for_sr_count(pacs, study, 2)
    time.sleep(3 * 1.5)
    srs = srs_in(pacs, study)
    assert len(srs) == 2
    second = next(sr for sr in srs if sr["00080018"]["Value"][0] != first["00080018"]["Value"][0])
    said = sr_finding(pacs, second)
    first_uid = first["00080018"]["Value"][0]
    assert said["predecessors"] == [first_uid]
    # one Device Observer UID per installation, not per study or report
    assert said["device_uid"] == first_said["device_uid"] != second["0020000E"]["Value"][0]
    assert dciodvfy_errors(pacs, second, road["root"]) == []
    assert said["finding"] == "glioma" and said["deciding"] == [uid_of(late_files[0])]
    # the whole study was re-scored: every instance received so far is referenced
    assert said["references"] == sorted(uid_of(f) for f in first_files + late_files)
    assert second["0020000E"]["Value"][0] == first["0020000E"]["Value"][0]  # the same SR series
    numbers = sorted(int(sr["00200013"]["Value"][0]) for sr in srs)
    assert numbers == [1, 2]
    hooks = [h for h in road["webhook"] if h["StudyInstanceUID"] == study]
    assert [h["supersedes"] for h in hooks] == [None, first_uid]
    assert hooks[1]["SRSOPInstanceUID"] == second["00080018"]["Value"][0]


def test_c_an_image_outside_intended_use_gets_an_sr_without_probability_and_no_sc(road):
    pacs, gateway = road["pacs"], road["gateway"]
    study = f"2.25.{uuid.uuid4().int}"
    files = series(road, study, 1, [CHEST])
    assert c_store(gateway.dicom_port, files) == [0]
    wait_for_srs(pacs, [study], timeout=120)
    time.sleep(3 * 1.5)
    (sr,) = srs_in(pacs, study)
    said = sr_finding(pacs, sr)
    assert said["finding"] == "OUTSIDE-USE" and said["meaning"] == "Outside intended use"
    assert "probability" not in said and said["deciding"] == []
    assert all("probability" not in group for group in said["groups"])
    assert instances_of_class(pacs, study, SC_CLASS) == []  # no heat map of a chest on a brain model
    assert said["text"].startswith("Outside intended use") and dciodvfy_errors(pacs, sr, road["root"]) == []
    (hook,) = [h for h in road["webhook"] if h["StudyInstanceUID"] == study]
    assert hook["class_name"] is None and hook["probability"] is None and hook["probabilities"] == {}
    assert hook["excluded_instances"] == [uid_of(files[0])] and hook["outside_intended_use"] is True


def test_a_mixed_study_is_decided_on_its_in_distribution_images_and_lists_the_excluded_one(road):
    pacs, gateway = road["pacs"], road["gateway"]
    study = f"2.25.{uuid.uuid4().int}"
    files = series(road, study, 1, NORMALS[:2] + [CHEST])
    assert c_store(gateway.dicom_port, files) == [0] * 3
    (sr,) = wait_for_sr_count(pacs, study, 1)
    said = sr_finding(pacs, sr)
    assert said["finding"] == "notumor" and said["excluded"] == [uid_of(files[2])]
    excluded = [g for g in said["groups"] if g.get("tracking", "").endswith("(outside intended use)")]
    assert len(excluded) == 1 and "probability" not in excluded[0]  # listed, never given a probability
    time.sleep(3 * 1.5)
    assert instances_of_class(pacs, study, SC_CLASS) == []  # a normal study gets no heat map


def test_predict_study_and_batch_decide_with_the_same_rule_and_list_excluded_files(road):
    import json

    study = f"2.25.{uuid.uuid4().int}"
    files = series(road, study, 1, NORMALS[:3] + [GLIOMA, CHEST] + NORMALS[3:6])
    result = run_module("serving.client", "--server", road["grpc"], "--model", "brain_mri", "--study",
                        "--model-repository", str(road["repo"]), *map(str, files))
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    said = lines[-1]["study"]
    assert said["class"] == "glioma" and said["abnormal"] is True and said["rule"] == "abnormal_first"
    assert said["deciding_file"] == str(files[3]) and said["excluded_files"] == [str(files[4])]
    chest_line = lines[4]  # abstention in the per-file line too: no class, no probabilities
    assert chest_line["class"] is None and chest_line["probabilities"] is None
    # without the repository the rule is not guessed
    refused = run_module("serving.client", "--server", road["grpc"], "--model", "brain_mri", "--study",
                         str(files[0]), expect=2)
    assert "--model-repository" in refused.stderr

    drop, output = road["root"] / "drop", road["root"] / "batch-out"
    shutil.copytree(files[0].parent, drop / "one")
    other = f"2.25.{uuid.uuid4().int}"
    series(road, other, 1, [CHEST])
    shutil.copytree(road["root"] / "inputs" / f"{other[-8:]}-1", drop / "two")
    run_module("serving.batch", "--drop", str(drop), "--output", str(output), "--server", road["grpc"],
               "--model", "brain_mri", "--model-repository", str(road["repo"]))
    studies = {row["StudyInstanceUID"]: row
               for row in map(json.loads, (output / "studies.jsonl").read_text().splitlines())}
    assert studies[study]["class"] == "glioma" and studies[study]["deciding_file"] == "one/003.dcm"
    assert studies[study]["excluded_files"] == ["one/004.dcm"]
    assert studies[other]["class"] is None and studies[other]["probability"] is None
    assert studies[other]["finding"] == "outside intended use"
