"""The record keys and schema.json: the one contract between ingest, training, evaluation and export.

Pure Python (no TensorFlow): `models/data.py` turns `FEATURES` into a tf.io parse spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medpipe.config import TaskConfig
from medpipe.errors import DataError

SCHEMA_VERSION = 1

IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
IMAGE_CHANNELS = "image/channels"
LABEL = "image/class/label"
LABEL_TEXT = "image/class/text"
SOURCE_ID = "image/source_id"
PSEUDONYM = "patient/pseudonym"

# Allow-listed DICOM attributes (keyword -> record key). Nothing else from a DICOM header leaves ingest.
DICOM_FIELDS: dict[str, str] = {
    "Modality": "dicom/modality",
    "BodyPartExamined": "dicom/body_part_examined",
    "ViewPosition": "dicom/view_position",
    "PhotometricInterpretation": "dicom/photometric_interpretation",
    "Rows": "dicom/rows",
    "Columns": "dicom/columns",
    "PixelSpacing": "dicom/pixel_spacing",
}

# Every key a record may carry and its tf.train.Feature kind.
FEATURES: dict[str, str] = {
    IMAGE_ENCODED: "bytes",
    IMAGE_FORMAT: "bytes",
    IMAGE_HEIGHT: "int64",
    IMAGE_WIDTH: "int64",
    IMAGE_CHANNELS: "int64",
    LABEL: "int64",
    LABEL_TEXT: "bytes",
    SOURCE_ID: "bytes",
    PSEUDONYM: "bytes",
    "dicom/modality": "bytes",
    "dicom/body_part_examined": "bytes",
    "dicom/view_position": "bytes",
    "dicom/photometric_interpretation": "bytes",
    "dicom/rows": "int64",
    "dicom/columns": "int64",
    "dicom/pixel_spacing": "float",
}

SCHEMA_FILE = "schema.json"
STATS_FILE = "stats.json"
REJECTED_FILE = "rejected.jsonl"


@dataclass(frozen=True)
class DatasetSchema:
    name: str
    task: str
    labels: tuple[str, ...]
    image_size: int
    channels: int
    splits: tuple[str, ...] = ("train", "val", "test")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_json(self) -> dict[str, Any]:
        body = {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "task": self.task,
            "labels": list(self.labels),
            "image": {"height": self.image_size, "width": self.image_size, "channels": self.channels, "format": "png"},
            "features": FEATURES,
            "splits": list(self.splits),
        }
        body["fingerprint"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        return body

    @classmethod
    def from_config(cls, config: TaskConfig) -> "DatasetSchema":
        return cls(config.name, config.task, tuple(config.labels), config.image.size, config.image.channels)


@dataclass(frozen=True)
class IngestStats:
    """The keys of stats.json (beam_pipelines.ingest.build_stats writes it) that other stages read: the drift
    baseline (pixel histogram, class mix) and the ingest's counts pushed to Prometheus."""
    name: str
    input_files: int
    written: int
    rejected: int
    duplicates_dropped: int
    rejected_by_reason: dict[str, int]
    class_distribution: dict[str, float]
    pixel_histogram: list[int]

    @classmethod
    def from_dict(cls, body: dict[str, Any], where: str = STATS_FILE) -> "IngestStats":
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in body]
        if missing:
            raise DataError(f"{where} has no {', '.join(missing)}: it is not the stats.json of this medpipe's "
                            "ingest; re-run `medpipe ingest` on that data")
        return cls(**{name: body[name] for name in names})

    @classmethod
    def read(cls, path: str | Path) -> "IngestStats":
        """From an ingest output folder or its stats.json."""
        path = Path(path)
        file = path / STATS_FILE if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"{file} does not exist: pass an ingest output folder or its stats.json")
        try:
            return cls.from_dict(json.loads(file.read_text(encoding="utf-8")), str(file))
        except json.JSONDecodeError as exc:
            raise DataError(f"{file} is not valid JSON ({exc})") from exc


def write_schema(directory: str | Path, schema: DatasetSchema) -> Path:
    path = Path(directory) / SCHEMA_FILE
    path.write_text(json.dumps(schema.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


def read_schema(directory: str | Path) -> DatasetSchema:
    """Read DIR/schema.json; a clear DataError when the directory is not an ingest output."""
    path = Path(directory) / SCHEMA_FILE
    if not path.is_file():
        raise DataError(
            f"{path} not found: {directory} is not a medpipe ingest output (run `medpipe ingest` to create it)"
        )
    body = json.loads(path.read_text(encoding="utf-8"))
    if body.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {body.get('schema_version')} is not {SCHEMA_VERSION}; re-run ingest")
    image = body["image"]
    return DatasetSchema(
        name=body["name"],
        task=body["task"],
        labels=tuple(body["labels"]),
        image_size=int(image["height"]),
        channels=int(image["channels"]),
        splits=tuple(body.get("splits", ("train", "val", "test"))),
    )


def check_schema_matches_config(schema: DatasetSchema, config: TaskConfig, where: str) -> None:
    """Fail before any training/evaluation when the data was ingested for another label set or image shape."""
    problems = []
    if tuple(schema.labels) != tuple(config.labels):
        problems.append(f"labels {list(schema.labels)} in the data vs {list(config.labels)} in the config")
    if schema.image_size != config.image.size:
        problems.append(f"image size {schema.image_size} in the data vs {config.image.size} in the config")
    if schema.channels != config.image.channels:
        problems.append(f"channels {schema.channels} in the data vs {config.image.channels} in the config")
    if schema.task != config.task:
        problems.append(f"task {schema.task} in the data vs {config.task} in the config")
    if problems:
        raise DataError(
            f"{where}: the data does not match the config ({'; '.join(problems)}); "
            f"re-ingest with this config or pass the config the data was made with"
        )
