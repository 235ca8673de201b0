"""REPO/models.config: the text-format `tensorflow.serving.ModelServerConfig` that `medpipe publish` writes and that
`medpipe serve`, the real tensorflow/serving binary (`--model_config_file`) and the quality gate read.

The one reader: protobuf text_format on the real proto (tensorflow_serving.config, protos only, no TensorFlow).
"""

from __future__ import annotations

from pathlib import Path

from medpipe.errors import ConfigError
from medpipe.files import write_atomic

CONFIG_FILE = "models.config"
HEADER = (
    "# TF Serving ModelServerConfig (text format), maintained by `medpipe publish`.\n"
    "# Real tensorflow/serving: --model_config_file=<this file>. Labels may point only at loaded versions unless\n"
    "# the server runs with --allow_version_labels_for_unavailable_models (publish first, then move the label).\n"
)


def parse_config_text(text: str, origin: str = "<text>"):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(f"{origin}: not a valid text ModelServerConfig: {exc}") from exc
    return config


def read_config(path: Path):
    """The ModelServerConfig in PATH, or an empty one when the file does not exist yet."""
    return parse_config_text(path.read_text(encoding="utf-8") if path.is_file() else "", str(path))


def write_config(path: Path, config) -> None:
    """Atomic replace so a polling server never reads half a file."""
    from google.protobuf import text_format

    write_atomic(path, HEADER + text_format.MessageToString(config))


def find_model(config, name: str):
    for entry in config.model_config_list.config:
        if entry.name == name:
            return entry
    return None


def version_labels(config, name: str) -> dict[str, int]:
    """{label: version} of model NAME ({} when it is not configured); CONFIG is a ModelServerConfig or its text."""
    entry = find_model(parse_config_text(config) if isinstance(config, str) else config, name)
    return {} if entry is None else {label: int(version) for label, version in entry.version_labels.items()}
