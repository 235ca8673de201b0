"""The batch PACS path: `medpipe ingest --input 'dicomweb+http://...?StudyDate=...'` against a real Orthanc gives the
records a folder ingest of the same files gives (by pixel hash), and one ingest per day gives one partition per day."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

import fixtures_adversarial as fa
from beam_pipelines import dicomweb_source, ingest
from conftest import ROOT, TEST_DEID_KEY
from orthanc import OrthancServer
from test_ingest import check_bookkeeping, parse, read_records

sys.path.insert(0, str(ROOT / "dags"))

CONFIG_FILE = str(ROOT / "config" / "brain_mri.yaml")
IN_PROCESS = ["--direct_running_mode=in_memory", "--direct_num_workers=1", "--set", "image.size=32"]
DAYS = ("20261101", "20261102", "20261103")
LABELS = ("glioma", "meningioma", "notumor", "pituitary")


def write_labels(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_source_url_parsing_and_instance_paths():
    query = dicomweb_source.parse_source("dicomweb+https://pacs:8042/dicom-web/?StudyDate=20261101-20261130"
                                         "&ModalitiesInStudy=MR")
    assert query.base == "https://pacs:8042/dicom-web"
    assert query.filters == (("StudyDate", "20261101-20261130"), ("ModalitiesInStudy", "MR"))
    path = dicomweb_source.instance_url(query.base, "1.2", "1.2.3", "1.2.3.4")
    assert dicomweb_source.split_instance_url(path) == (query.base, "1.2", "1.2.3", "1.2.3.4")
    with pytest.raises(Exception, match="expected dicomweb"):
        dicomweb_source.parse_source("http://pacs/dicom-web")
    with pytest.raises(Exception, match="--labels"):
        dicomweb_source.list_dicomweb_inputs("dicomweb+http://127.0.0.1:9/x", None)
    with pytest.raises(Exception, match="--labels is for a DICOMweb"):
        ingest.list_inputs(str(ROOT / "sample_data" / "brain_mri"), labels="labels.csv")


@pytest.fixture(scope="module")
def pacs_with_studies(tmp_path_factory):
    """Orthanc holding 12 one-slice MR studies over 3 days (one per class a day) + 4 studies a month later; the same
    in-range files in class folders; a label manifest keyed by AccessionNumber where a study has one, else by
    StudyInstanceUID."""
    root = tmp_path_factory.mktemp("pacs_ingest")
    folder = root / "folder"
    rows, per_day = [], {day: 0 for day in DAYS}
    with OrthancServer(root / "orthanc") as pacs:
        number = 0
        for label in LABELS:
            for source in fa.sample_jpegs(label, 4):
                day = DAYS[number % 4] if number % 4 < 3 else "20261201"
                number += 1
                study = f"2.25.{900000 + number}"
                target = folder / label / f"{number:03d}.dcm"
                target.parent.mkdir(parents=True, exist_ok=True)
                accession = f"ACC{number:04d}" if number % 2 else ""
                fa.mr_dicom_from_jpeg(source, target, study_uid=study, series_uid=f"{study}.1",
                                      sop_uid=f"{study}.1.1", study_date=day, accession=accession)
                pacs.upload(target.read_bytes())
                rows.append({"StudyInstanceUID": "" if accession else study, "AccessionNumber": accession,
                             "label": label})
                if day not in DAYS:
                    target.unlink()  # outside the queried range: not in the folder either
                    continue
                per_day[day] += 1
        labels = write_labels(root / "labels.csv", rows)
        yield {"pacs": pacs, "folder": folder, "per_day": per_day, "labels": labels}


def records_by_hash(directory: Path) -> set[tuple[bytes, bytes, str]]:
    """(source id = keyed pixel hash, label, split) of every written record."""
    return {(parse(record)["image/source_id"][0], parse(record)["image/class/text"][0], name.split("-")[0])
            for name, records in read_records(directory).items() for record in records}


@pytest.mark.slow
def test_dicomweb_ingest_of_a_date_range_equals_the_folder_ingest(pacs_with_studies, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPIPE_DEID_KEY", TEST_DEID_KEY)
    data = pacs_with_studies
    folder_out, web_out = tmp_path / "folder", tmp_path / "web"
    folder_stats = ingest.run(["--config", CONFIG_FILE, "--input", str(data["folder"]), "--output", str(folder_out),
                               *IN_PROCESS])
    source = f"dicomweb+{data['pacs'].dicomweb}?StudyDate={DAYS[0]}-{DAYS[-1]}&ModalitiesInStudy=MR"
    web_stats = ingest.run(["--config", CONFIG_FILE, "--input", source, "--labels", str(data["labels"]),
                            "--output", str(web_out), *IN_PROCESS])
    check_bookkeeping(web_out)
    assert web_stats["input_files"] == folder_stats["input_files"] == sum(data["per_day"].values()) == 12
    for key in ("written", "rejected", "duplicates_dropped", "splits", "classes", "pixel_histogram"):
        assert web_stats[key] == folder_stats[key], key
    assert records_by_hash(web_out) == records_by_hash(folder_out)
    assert len(records_by_hash(folder_out)) == 12


@pytest.mark.slow
def test_backfill_over_three_days_gives_three_partitions(pacs_with_studies, tmp_path, monkeypatch):
    """What `airflow backfill create` over 2026-11-01..03 runs: medpipe_ingest's source template resolved per
    logical date ({ds_nodash}), one ingest per day into that day's partition."""
    from medpipe_dag_common import partition_fields, resolve_path

    monkeypatch.setenv("MEDPIPE_DEID_KEY", TEST_DEID_KEY)
    data = pacs_with_studies
    template = f"dicomweb+{data['pacs'].dicomweb}?StudyDate={{ds_nodash}}&ModalitiesInStudy=MR"
    root = tmp_path / "ingested" / "brain_mri"
    for day in ("2026-11-01", "2026-11-02", "2026-11-03"):
        fields = partition_fields("brain_mri", day)
        stats = ingest.run(["--config", CONFIG_FILE, "--input", resolve_path(template, **fields), "--labels",
                            str(data["labels"]), "--output", str(root / day), *IN_PROCESS])
        assert stats["input_files"] == stats["written"] == data["per_day"][day.replace("-", "")] == 4
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["2026-11-01", "2026-11-02", "2026-11-03"]


def test_fetch_for_batch_inference_pulls_one_day(pacs_with_studies, tmp_path):
    """medpipe_batch_inference's PACS source: the day's instances as files, with an index naming their UIDs."""
    data = pacs_with_studies
    source = f"dicomweb+{data['pacs'].dicomweb}?StudyDate=20261102"
    paths = dicomweb_source.fetch(source, str(tmp_path / "instances"))
    assert len(paths) == data["per_day"]["20261102"] == 4
    rows = list(csv.DictReader((tmp_path / "instances" / "instances.csv").open()))
    assert [row["file"] for row in rows] == [Path(p).name for p in paths]
    import pydicom

    assert {str(pydicom.dcmread(p).StudyDate) for p in paths} == {"20261102"}
    assert {row["StudyInstanceUID"] for row in rows} == {str(pydicom.dcmread(p).StudyInstanceUID) for p in paths}


def test_dicomweb_credentials_from_the_environment_or_the_airflow_connection(monkeypatch):
    from medpipe_dag_common import dicomweb_env

    for name in ("MEDPIPE_DICOMWEB_USER", "MEDPIPE_DICOMWEB_PASSWORD", "MEDPIPE_DICOMWEB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_MEDPIPE_PACS", '{"conn_type": "http", "login": "radiology", "password": "pw"}')
    env = dicomweb_env()
    assert env == {"MEDPIPE_DICOMWEB_USER": "radiology", "MEDPIPE_DICOMWEB_PASSWORD": "pw"}
    monkeypatch.setenv("AIRFLOW_CONN_MEDPIPE_PACS", '{"conn_type": "http", "password": "a-token"}')
    assert dicomweb_env() == {"MEDPIPE_DICOMWEB_TOKEN": "a-token"}
    monkeypatch.setenv("MEDPIPE_DICOMWEB_TOKEN", "from-env")  # the worker's own environment wins
    assert dicomweb_env() == {"MEDPIPE_DICOMWEB_TOKEN": "from-env"}
    assert dicomweb_source.session().headers["Authorization"] == "Bearer from-env"
    monkeypatch.delenv("MEDPIPE_DICOMWEB_TOKEN")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert dicomweb_source.session().auth == ("radiology", "pw")


@pytest.mark.slow
def test_batch_inference_scores_a_pacs_day(pacs_with_studies, trained_sample_run, tmp_path):
    """medpipe_batch_inference with a DICOMweb drop_uri: `serving.batch --pacs` fetches the day's instances into the
    partition's instances/ and scores them against a real server; one outcome per instance."""
    import json

    from conftest import run_module
    from test_serving import MODEL, start_server, stop_server

    repo = tmp_path / "models"
    run_module("serving.publish", "--run", str(trained_sample_run), "--repository", str(repo), "--model-name", MODEL,
               "--label", "stable", "--force")
    process, grpc, _ = start_server(repo, tmp_path)
    try:
        output = tmp_path / "predictions" / "2026-11-02"
        source = f"dicomweb+{pacs_with_studies['pacs'].dicomweb}?StudyDate=20261102&ModalitiesInStudy=MR"
        run_module("serving.batch", "--pacs", source, "--output", str(output), "--server", grpc, "--model", MODEL,
                   "--label", "stable")
    finally:
        stop_server(process)
    rows = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    index = list(csv.DictReader((output / "instances" / "instances.csv").open()))
    assert len(rows) == len(index) == pacs_with_studies["per_day"]["20261102"] == 4
    assert [row["file"] for row in rows] == [row["file"] for row in index]  # paths relative to instances/
    assert {row["outcome"] for row in rows} == {"predicted"} and all(row["class"] in LABELS for row in rows)
    assert json.loads((output / "summary.json").read_text())["predicted"] == 4
    assert not list(output.parent.glob(".*staging*"))
