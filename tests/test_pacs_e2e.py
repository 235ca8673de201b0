"""The PACS road end to end, on real parts: Debian's Orthanc (destination PACS), `medpipe serve` with the session's
trained sample model, and `medpipe gateway` with its DIMSE SCP and STOW-RS door. Studies go in with dcmtk's storescu,
pynetdicom and STOW-RS; structured reports come back into Orthanc and are found by QIDO-RS.

Acceptance (issue 13): one SR per routed study whose finding is `medpipe predict`'s answer for the same file(s); none
for unrouted instances; no planted PHI string in any log; SIGKILL after the acknowledgement and a restart deliver the
SR once; a destination down for 30 s (MEDPIPE_TEST_PACS_DOWN_S) gets its SRs when it is back.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

import fixtures_adversarial as fa
from conftest import TEST_DEID_KEY, run_module
from orthanc import OrthancServer
from pacs_support import (GatewayProcess, WebhookReceiver, c_store, sr_finding, srs_in, storescu, stow, wait_for_srs,
                          write_pacs_config)
from test_serving import publish, start_server, stop_server

pytestmark = pytest.mark.slow
MODEL = "brain_mri"
DOWN_SECONDS = float(os.environ.get("MEDPIPE_TEST_PACS_DOWN_S", "30"))  # the 30 s; shorter for local runs


@pytest.fixture(scope="module")
def road(trained_sample_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs_road")
    repo = root / "repo"
    publish(trained_sample_run, repo)
    serve, grpc, _ = start_server(repo, root)
    pacs = OrthancServer(root / "orthanc").start()
    webhook = WebhookReceiver()
    config = write_pacs_config(root / "pacs.yaml", root / "spool", webhook=webhook.url)
    gateway = GatewayProcess(root, ["--upstream", grpc, "--allow-anonymous", "--audit-log", str(root / "audit.jsonl"),
                                    "--model-repository", str(repo), "--results-to", f"dicomweb+{pacs.dicomweb}",
                                    "--pacs-config", str(config)],
                             env={"MEDPIPE_DEID_KEY": TEST_DEID_KEY})
    try:
        gateway.start()
        yield {"root": root, "pacs": pacs, "gateway": gateway, "grpc": grpc, "run": trained_sample_run, "repo": repo,
               "inputs": root / "inputs", "planted": set(), "uids": set(), "webhook": webhook.received}
    finally:
        webhook.close()
        gateway.kill()
        stop_server(serve)
        pacs.stop()


def make_study(road, name: str, label: str, slices: int = 1, offset: int = 0, phi: bool = True) -> tuple[str, list]:
    """A one-series MR study from sample brain slices, PHI planted; -> (StudyInstanceUID, files)."""
    folder = road["inputs"] / name
    folder.mkdir(parents=True, exist_ok=True)
    study = f"2.25.{uuid.uuid4().int}"
    files = []
    for index, source in enumerate(fa.sample_jpegs(label, offset + slices)[offset:]):
        path = folder / f"{index:03d}.dcm"
        road["planted"].update(fa.mr_dicom_from_jpeg(source, path, study_uid=study, series_uid=f"{study}.1",
                                                     sop_uid=f"{study}.1.{index + 1}", instance_number=index + 1,
                                                     phi=phi))
        road["uids"].update((study, f"{study}.1.{index + 1}"))  # header values too: never logged
        files.append(path)
    return study, files


def study_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).StudyInstanceUID)


def predict(road, files: list[Path]) -> list[dict]:
    """`medpipe predict` (the clinicians' client) on the same files, against the same served model."""
    result = run_module("serving.client", "--server", road["grpc"], "--model", MODEL, "--config",
                        str(road["run"] / "config.yaml"), *map(str, files))
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def expected_finding(road, lines: list[dict], labels: list[str]):
    """The model's own study rule (its assets/study_rule.json, medpipe.study) applied to predict's per-file
    probabilities: (class or None when no file is in distribution, probability)."""
    from medpipe.study import decide, load_rule

    version = max(p for p in (road["repo"] / MODEL).iterdir() if p.name.isdigit())
    decision = decide([dict(zip(labels, line["probabilities"] or [])) for line in lines],
                      [line["in_distribution"] for line in lines], load_rule(version))
    return decision.class_name, decision.probability


def scan_logs_for_phi(road) -> None:
    logs = [*road["gateway"].logs, road["root"] / "audit.jsonl", road["root"] / "server.log"]
    for path in logs:
        text = path.read_text(errors="replace")
        leaked = sorted(s for s in road["planted"] | road["uids"] if s and s in text)
        assert not leaked, f"{path.name} shows planted PHI: {leaked[:3]}"


# ----------------------------------------------------------------------------------------------------------------
def test_routed_studies_get_one_sr_equal_to_medpipe_predict_and_unrouted_get_none(road):
    pacs, gateway = road["pacs"], road["gateway"]
    import yaml

    labels = yaml.safe_load((road["run"] / "config.yaml").read_text())["labels"]
    singles = {label: make_study(road, f"single-{label}", label) for label in ("glioma", "meningioma", "pituitary")}
    series_uid, series_files = make_study(road, "series", "notumor", slices=4)
    stow_uid, stow_files = make_study(road, "stow", "glioma", offset=3)
    # sample DICOMs: MR ones are routed (one of them JPEG 2000, one multi-frame), the rest are not
    routed_samples = [fa.SAMPLE_DICOM / "MR2_J2KI.dcm", fa.SAMPLE_DICOM / "MR-MONO2-8-16x-heart.dcm"]
    unrouted = [fa.SAMPLE_DICOM / name for name in ("CT-MONO2-16-brain.dcm", "CR-MONO1-10-chest.dcm",
                                                    "US-PAL-8-10x-echo.dcm", "JPEG-LL.dcm")]
    phi_ct = road["inputs"] / "phi_ct.dcm"
    road["planted"].update(s for s in fa.phi_dicom(phi_ct) if s != "PHIZQX")
    unrouted.append(phi_ct)
    truncated = fa.SAMPLE_DICOM / "emri_small_jpeg_2k_lossless_too_short.dcm"  # routed, but cannot be decoded

    from pynetdicom import AE

    echo = AE(ae_title="MEDPIPETEST")
    echo.add_requested_context("1.2.840.10008.1.1")
    assoc = echo.associate("127.0.0.1", gateway.dicom_port, ae_title="MEDPIPE")
    assert assoc.is_established and int(assoc.send_c_echo().Status) == 0  # C-ECHO
    assoc.release()
    stranger = AE(ae_title="NOTALLOWED")
    stranger.add_requested_context("1.2.840.10008.1.1")
    assert stranger.associate("127.0.0.1", gateway.dicom_port, ae_title="MEDPIPE").is_rejected  # allow-list

    for label, (_, files) in singles.items():
        storescu(gateway.dicom_port, files)
    assert c_store(gateway.dicom_port, series_files) == [0] * 4
    uncompressed = [p for p in unrouted if p.name not in ("US-PAL-8-10x-echo.dcm", "JPEG-LL.dcm")]
    storescu(gateway.dicom_port, [routed_samples[1], *uncompressed])  # storescu proposes uncompressed syntaxes
    assert c_store(gateway.dicom_port, [p for p in unrouted if p not in uncompressed]) == [0, 0]  # RLE, JPEG-LL
    status, body = stow(gateway.rest, [*stow_files, routed_samples[0], truncated])
    assert status == 200 and len(body["00081199"]["Value"]) == 3, body

    expected = {uid: files for uid, files in singles.values()}
    expected[series_uid] = series_files
    expected[stow_uid] = stow_files
    for path in routed_samples:
        expected[study_of(path)] = [path]
    waited = wait_for_srs(pacs, list(expected), timeout=180)
    time.sleep(3 * 1.5 + 1)  # longer than the stability window: any second SR would have been made by now
    answers = {line["file"]: line for line in predict(road, [f for files in expected.values() for f in files])}
    for uid, files in expected.items():
        srs = srs_in(pacs, uid)
        assert len(srs) == 1, f"{len(srs)} SRs for a routed study"
        said = sr_finding(pacs, srs[0])
        lines = [answers[str(f)] for f in files]
        assert all("class" in line for line in lines), lines
        name, probability = expected_finding(road, lines, labels)
        if name is None:  # no file in distribution: predict withholds the class, the SR says so and nothing else
            assert said["meaning"] == "Outside intended use" and "probability" not in said
        else:  # files outside intended use are left out and listed; the others decide by the model's rule
            assert said["meaning"] == name and said["probability"] == pytest.approx(probability, abs=1e-5)
            assert said["excluded"] == sorted(str(__import__("pydicom").dcmread(f).SOPInstanceUID)
                                              for f, line in zip(files, lines) if line["in_distribution"] is False)
        assert said["algorithm"] == MODEL and int(said["algorithm_version"]) > 0
        hooks = [h for h in road["webhook"] if h["StudyInstanceUID"] == uid]  # the apps' JSON, once per result
        assert len(hooks) == 1
        if hooks[0]["outside_intended_use"]:  # the apps' JSON says so in its own field, with no class
            assert hooks[0]["class_name"] is None and said["meaning"] == "Outside intended use"
        else:
            assert hooks[0]["class_name"] == said["meaning"]
        assert hooks[0]["SRSOPInstanceUID"] == srs[0]["00080018"]["Value"][0]
        assert said["references"] == sorted(str(__import__("pydicom").dcmread(f).SOPInstanceUID) for f in files)
    for path in [*unrouted, truncated]:
        assert srs_in(pacs, study_of(path)) == [], path.name
    assert len(road["webhook"]) == len(expected)
    # the apps' JSON names the study by its UIDs (to attach the result), nothing else from the header
    assert not [s for s in road["planted"] if s in json.dumps(road["webhook"])]
    # the refused instance is kept for the operator, not lost
    assert list((road["root"] / "spool" / "rejected").rglob("*.dcm"))
    audit = [json.loads(line) for line in (road["root"] / "audit.jsonl").read_text().splitlines()]
    outcomes = [r.get("outcome") for r in audit if r.get("event") == "pacs.received"]
    assert outcomes.count("not routed") == len(unrouted) and outcomes.count("spooled") == 3 + 4 + 1 + 3
    assert sum(r.get("event") == "pacs.delivered" for r in audit) == len(expected)
    assert max(waited.values()) < 180
    scan_logs_for_phi(road)


def test_sigkill_after_acknowledgement_then_restart_delivers_once(road):
    pacs, gateway = road["pacs"], road["gateway"]
    uid, files = make_study(road, "killed", "meningioma", slices=2, offset=5)
    assert c_store(gateway.dicom_port, files) == [0, 0]  # acknowledged: on disk
    gateway.kill()  # within the 1.5 s stability window: nothing was inferred yet
    assert srs_in(pacs, uid) == []
    gateway.start()
    wait_for_srs(pacs, [uid], timeout=120)
    time.sleep(3 * 1.5 + 1)
    assert len(srs_in(pacs, uid)) == 1
    from serving.gateway.audit import verify

    assert verify(road["root"] / "audit.jsonl") is None  # the audit chain survived the SIGKILL
    scan_logs_for_phi(road)


def test_destination_down_then_back_gets_every_sr_once(road):
    pacs, gateway = road["pacs"], road["gateway"]
    pacs.stop()
    studies = [make_study(road, f"outage-{label}", label, offset=7) for label in ("glioma", "pituitary")]
    storescu(gateway.dicom_port, studies[0][1])
    status, _ = stow(gateway.rest, studies[1][1])
    assert status == 200
    deadline = time.monotonic() + 60
    while (gateway.metric("medpipe_pacs_queue_length", stage="outbox") or 0) < 2:
        assert time.monotonic() < deadline, "the results never reached the outbox"
        time.sleep(0.5)
    time.sleep(max(0.0, DOWN_SECONDS - 5))
    assert gateway.metric("medpipe_pacs_queue_length", stage="outbox") == 2  # retried, kept, nothing lost
    gateway.kill()  # and a crash during the outage: the outbox is on disk
    gateway.start()
    pacs.start()
    wait_for_srs(pacs, [uid for uid, _ in studies], timeout=60)
    time.sleep(3)
    assert [len(srs_in(pacs, uid)) for uid, _ in studies] == [1, 1]
    assert gateway.metric("medpipe_pacs_queue_length", stage="outbox") == 0
    scan_logs_for_phi(road)


def test_full_spool_disk_refuses_retryably_then_processes_once_space_returns(road, tmp_path):
    """The spool on a real 64 MB tmpfs: under reserve_mb the DIMSE door answers A700 and STOW-RS 507; once space
    is freed the same studies are accepted and their SRs reach Orthanc (issue 34)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); run as root to test a full disk")
    config = tmp_path / "pacs.yaml"
    config.write_text(f"""spool: {disk / "spool"}
calling_aets: [MEDPIPETEST]
stable_seconds: 1.5
scan_seconds: 0.2
max_instance_mb: 8
reserve_mb: 16
retry: {{initial_seconds: 0.5, max_seconds: 2}}
routes: [{{model: {MODEL}, modalities: [MR]}}]
""")
    gateway = GatewayProcess(tmp_path, ["--upstream", road["grpc"], "--allow-anonymous",
                                        "--audit-log", str(tmp_path / "audit.jsonl"),
                                        "--model-repository", str(road["root"] / "repo"),
                                        "--results-to", f"dicomweb+{road['pacs'].dicomweb}",
                                        "--pacs-config", str(config)], env={"MEDPIPE_DEID_KEY": TEST_DEID_KEY})
    studies = [make_study(road, f"full-{label}", label, offset=9) for label in ("glioma", "notumor")]
    try:
        gateway.start()
        with open(disk / "ballast", "wb") as handle:  # leave 10 MB: under the 16 MB reserve
            handle.write(bytes(54 * 2**20))
        assert c_store(gateway.dicom_port, studies[0][1]) == [0xA700]
        assert stow(gateway.rest, studies[1][1])[0] == 507
        assert not list((disk / "spool" / "incoming").rglob("*.dcm"))
        (disk / "ballast").unlink()  # space returns: the senders' retries go through
        assert c_store(gateway.dicom_port, studies[0][1]) == [0]
        assert stow(gateway.rest, studies[1][1])[0] == 200
        wait_for_srs(road["pacs"], [uid for uid, _ in studies], timeout=120)
    finally:
        gateway.kill()
        subprocess.run(["umount", "-l", str(disk)], check=False)
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert sum("disk_full" in (r.get("outcome"), r.get("reason")) for r in audit) >= 2


@pytest.mark.slow
def test_the_compose_lua_script_forwards_a_study_once(road, tmp_path):
    """Issue 28: config/orthanc/medpipe-forward.lua in a real Orthanc with the compose config's LuaScripts and
    UserMetadata. The study is forwarded when stable; medpipe's SR landing in it makes it stable again, and that
    forwards nothing: one prediction for the study (no replay), one SR. A late series then goes alone."""
    from conftest import ROOT

    compose = json.loads((ROOT / "config" / "orthanc" / "orthanc.json").read_text())
    pacs = OrthancServer(tmp_path / "orthanc", aet="LUAPACS", stable_age=1, extra={
        "LuaScripts": [str(ROOT / "config" / "orthanc" / "medpipe-forward.lua")],
        "UserMetadata": compose["UserMetadata"]}).start()
    config = write_pacs_config(tmp_path / "pacs.yaml", tmp_path / "spool", stable_seconds=1.0, calling=("LUAPACS",))
    audit = tmp_path / "audit.jsonl"
    gateway = GatewayProcess(tmp_path, ["--upstream", road["grpc"], "--allow-anonymous", "--audit-log", str(audit),
                                        "--model-repository", str(road["repo"]),
                                        "--results-to", f"dicomweb+{pacs.dicomweb}", "--pacs-config", str(config)],
                             env={"MEDPIPE_DEID_KEY": TEST_DEID_KEY})
    try:
        gateway.start()
        # the compose entry, pointed at this gateway's port (Orthanc takes modalities at run time too)
        request = urllib.request.Request(f"{pacs.http}/modalities/medpipe", method="PUT", data=json.dumps(
            {"AET": "MEDPIPE", "Host": "127.0.0.1", "Port": gateway.dicom_port}).encode())
        urllib.request.urlopen(request, timeout=10).close()
        study, files = make_study({**road, "inputs": tmp_path / "inputs"}, "lua", "glioma", slices=3, phi=False)
        for path in files:
            pacs.upload(path.read_bytes())
        wait_for_srs(pacs, [study], timeout=180)
        time.sleep(6)  # the SR made the study unstable: Orthanc's StableAge (1 s) passes several times over

        def predicted() -> list[dict]:
            return [json.loads(line) for line in audit.read_text().splitlines()
                    if '"event":"predict"' in line and '"door":"dimse"' in line]

        assert len(srs_in(pacs, study)) == 1
        assert sum(record["images"] for record in predicted()) == 3, predicted()
        assert '"pacs.replay_skipped"' not in audit.read_text()
        # a late series of the same study: only its instance goes, and the study is re-opened (a second SR)
        late = tmp_path / "late.dcm"
        fa.mr_dicom_from_jpeg(fa.sample_jpegs("notumor", 1)[0], late, study_uid=study, series_uid=f"{study}.2",
                              sop_uid=f"{study}.2.1", phi=False)
        pacs.upload(late.read_bytes())
        deadline = time.monotonic() + 180
        while len(srs_in(pacs, study)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(srs_in(pacs, study)) == 2
        time.sleep(4)
        assert len(srs_in(pacs, study)) == 2 and '"pacs.replay_skipped"' not in audit.read_text()
    finally:
        gateway.kill()
        pacs.stop()
