"""A PACS as an ingest source: `medpipe ingest --input 'dicomweb+http://HOST:PORT/ROOT?StudyDate=20261101-20261130&
ModalitiesInStudy=MR' --labels labels.csv`.

    QIDO-RS  GET ROOT/studies?<filters>                      the matching studies (paged), at pipeline construction,
             GET ROOT/studies/{study}/instances               like a folder listing: small metadata only
    WADO-RS  GET ROOT/studies/{s}/series/{se}/instances/{i}   the instance bytes, inside the Beam workers
                                                              (PreprocessImages), as stored (transfer-syntax=*)

The query string holds QIDO-RS study filters (DICOM keywords: StudyDate as a date or a range, ModalitiesInStudy,
AccessionNumber, ...). Labels come from a CSV manifest keyed by StudyInstanceUID or AccessionNumber
(`StudyInstanceUID,label[,patient_id]` or `AccessionNumber,label[,patient_id]`); an instance whose study has no
label is rejected as missing_label, exactly like a file outside a class folder, so the counts, splits, de-identification
and reports are the folder ingest's (the records are the same, by pixel hash, for the same files).

Credentials: MEDPIPE_DICOMWEB_TOKEN (bearer) or MEDPIPE_DICOMWEB_USER + MEDPIPE_DICOMWEB_PASSWORD in the launcher's and
the workers' environment (the medpipe_ingest DAG fills them from the Airflow connection `medpipe_pacs`).

`python -m beam_pipelines.dicomweb_source --input URL --output DIR` downloads the matching instances into DIR (the
batch-inference DAG's PACS source).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import urllib.parse
from dataclasses import dataclass
from typing import Optional, Sequence

from medpipe.errors import DataError

LOG = logging.getLogger("medpipe.ingest.dicomweb")
SCHEMES = ("dicomweb+http://", "dicomweb+https://")
PAGE = 500  # QIDO-RS results per request (servers cap this; Orthanc's default is 100 without a limit)
TIMEOUT = 60.0


def is_dicomweb(source: str) -> bool:
    return source.startswith(SCHEMES)


@dataclass(frozen=True)
class DicomWebQuery:
    base: str  # http(s)://HOST:PORT/ROOT
    filters: tuple[tuple[str, str], ...]  # QIDO-RS study-level filters, in the order given


def parse_source(source: str) -> DicomWebQuery:
    if not is_dicomweb(source):
        raise DataError(f"{source!r} is not a DICOMweb source; expected dicomweb+http(s)://HOST:PORT/ROOT?filters")
    parts = urllib.parse.urlsplit(source[len("dicomweb+"):])
    if not parts.hostname:
        raise DataError(f"{source!r}: no host; expected dicomweb+http://HOST:PORT/ROOT?StudyDate=YYYYMMDD-YYYYMMDD")
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    filters = tuple(urllib.parse.parse_qsl(parts.query, keep_blank_values=False))
    return DicomWebQuery(base, filters)


def instance_url(base: str, study: str, series: str, sop: str) -> str:
    """The InputItem path of one instance: its WADO-RS URL behind the dicomweb+ scheme."""
    return f"dicomweb+{base}/studies/{study}/series/{series}/instances/{sop}"


def split_instance_url(path: str) -> tuple[str, str, str, str]:
    """instance_url's inverse: (base, study, series, sop)."""
    url = path[len("dicomweb+"):]
    head, _, sop = url.rpartition("/instances/")
    head, _, series = head.rpartition("/series/")
    base, _, study = head.rpartition("/studies/")
    if not (base and study and series and sop):
        raise DataError(f"{path!r} is not a DICOMweb instance path")
    return base, study, series, sop


# ---------------------------------------------------------------------------------------------------------------
# HTTP
def session():
    """A requests session with the environment's credentials (no credentials = none sent)."""
    import requests

    result = requests.Session()
    token = os.environ.get("MEDPIPE_DICOMWEB_TOKEN", "")
    user, password = os.environ.get("MEDPIPE_DICOMWEB_USER", ""), os.environ.get("MEDPIPE_DICOMWEB_PASSWORD", "")
    if token:
        result.headers["Authorization"] = f"Bearer {token}"
    elif user:
        result.auth = (user, password)
    return result


def client(base: str, http=None):
    from dicomweb_client.api import DICOMwebClient

    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # its INFO lines name studies by UID

    return DICOMwebClient(url=base, session=http or session())


def _value(item: dict, tag: str) -> Optional[str]:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


@dataclass(frozen=True)
class InstanceRef:
    study: str
    series: str
    sop: str
    accession: Optional[str]


def search_instances(query: DicomWebQuery, web=None) -> list[InstanceRef]:
    """QIDO-RS: the studies matching the filters, then each study's instances; sorted by (study, series, sop)."""
    import requests

    web = web or client(query.base)
    try:
        studies = web.search_for_studies(search_filters=dict(query.filters), get_remaining=True,
                                         fields=["AccessionNumber"], limit=PAGE)
        refs = []
        for study in studies:
            study_uid = _value(study, "0020000D")
            if not study_uid:
                continue
            accession = _value(study, "00080050")
            for instance in web.search_for_instances(study_instance_uid=study_uid, get_remaining=True, limit=PAGE,
                                                     fields=["SeriesInstanceUID"]):
                series, sop = _value(instance, "0020000E"), _value(instance, "00080018")
                if series and sop:
                    refs.append(InstanceRef(study_uid, series, sop, accession))
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise DataError(f"QIDO-RS search at {query.base} answered HTTP {status}; check the URL, the filters "
                        f"({', '.join(k for k, _ in query.filters) or 'none'}) and the credentials "
                        f"(MEDPIPE_DICOMWEB_USER/PASSWORD or MEDPIPE_DICOMWEB_TOKEN)") from None
    except requests.RequestException as exc:
        raise DataError(f"cannot reach the DICOMweb server at {query.base} ({type(exc).__name__}); is it running?") \
            from None
    return sorted(refs, key=lambda ref: (ref.study, ref.series, ref.sop))


_SESSIONS: dict = {}


def retrieve(path: str) -> bytes:
    """WADO-RS: one instance as a DICOM file, in the transfer syntax it is stored in (no transcoding, so the decoded
    pixels are those of the stored object). One session per process and server (keep-alive)."""
    import pydicom
    import requests

    base, study, series, sop = split_instance_url(path)
    web = _SESSIONS.get(base)
    if web is None:
        web = _SESSIONS[base] = client(base)
    try:
        dataset = web.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise OSError(f"WADO-RS answered HTTP {status}") from None
    except requests.RequestException as exc:
        raise OSError(f"WADO-RS failed ({type(exc).__name__})") from None
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# labels and listing
def read_labels(path: str) -> dict[str, tuple[Optional[str], Optional[str]]]:
    """CSV with a label column and a StudyInstanceUID and/or AccessionNumber column (each row fills one of them)
    -> {study UID or accession number: (label, patient_id or None)}."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        text = handle.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    keys = [name for name in ("StudyInstanceUID", "AccessionNumber") if name in columns]
    if not keys or "label" not in columns:
        raise DataError(f"{path}: a DICOMweb label manifest needs a label column and a StudyInstanceUID or "
                        f"AccessionNumber column (optional patient_id); got {columns}")
    labels = {}
    for row in reader:
        entry = ((row.get("label") or "").strip() or None, (row.get("patient_id") or "").strip() or None)
        for key in keys:
            value = (row.get(key) or "").strip()
            if value:
                labels[f"{key}={value}"] = entry
    return labels


def list_dicomweb_inputs(source: str, labels_path: Optional[str]):
    """The ingest's InputItems for a DICOMweb source: one per instance, labelled through the manifest."""
    from beam_pipelines.records import InputItem

    query = parse_source(source)
    if labels_path is None:
        raise DataError("a DICOMweb source needs --labels CSV (StudyInstanceUID,label or AccessionNumber,label): "
                        "the PACS does not know the training labels")
    labels = read_labels(labels_path)
    refs = search_instances(query)
    if not refs:
        raise DataError(f"QIDO-RS found no instance at {query.base} for "
                        f"{'&'.join(f'{k}={v}' for k, v in query.filters) or 'no filter'}; check the date range")
    items = []
    for ref in refs:
        label, patient = (labels.get(f"StudyInstanceUID={ref.study}") or labels.get(f"AccessionNumber={ref.accession}")
                          or (None, None))
        items.append(InputItem(path=instance_url(query.base, ref.study, ref.series, ref.sop), label=label,
                               patient_id=patient))
    LOG.info("DICOMweb: %d instances in %d studies from %s", len(items), len({r.study for r in refs}), query.base)
    return items


# ---------------------------------------------------------------------------------------------------------------
# fetch (the batch-inference DAG's PACS source)
def fetch(source: str, output: str) -> list[str]:
    """Download every matching instance into OUTPUT/<n>.dcm (names carry no UID) and OUTPUT/instances.csv (file ->
    StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, AccessionNumber); returns the paths."""
    from pathlib import Path

    query = parse_source(source)
    refs = search_instances(query)
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    paths, index = [], io.StringIO()
    writer = csv.writer(index)
    writer.writerow(["file", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber"])
    for number, ref in enumerate(refs):
        target = folder / f"{number:06d}.dcm"
        target.write_bytes(retrieve(instance_url(query.base, ref.study, ref.series, ref.sop)))
        writer.writerow([target.name, ref.study, ref.series, ref.sop, ref.accession or ""])
        paths.append(str(target))
    (folder / "instances.csv").write_text(index.getvalue())
    LOG.info("DICOMweb: fetched %d instances into %s", len(paths), output)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m beam_pipelines.dicomweb_source",
                                     description="Download the instances a DICOMweb query matches into a folder.")
    parser.add_argument("--input", required=True, help="dicomweb+http(s)://HOST:PORT/ROOT?StudyDate=...")
    parser.add_argument("--output", required=True, help="folder to write NNNNNN.dcm files into")
    args = parser.parse_args(argv)
    fetch(args.input, args.output)
    return 0


if __name__ == "__main__":
    from medpipe.cli import module_main

    module_main(main)
