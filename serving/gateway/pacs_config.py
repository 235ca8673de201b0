"""Typed configuration of the gateway's PACS doors (DIMSE C-STORE SCP, DICOMweb STOW-RS) and result delivery.

    medpipe gateway ... --dicom-port 11112 --results-to dicomweb+http://pacs:8042/dicom-web --pacs-config config/pacs.yaml

One YAML file (config/pacs.yaml is the commented example), loaded once at start-up with the same checks as the task
configs (`medpipe.config`): an unknown key or a wrong type stops the gateway naming the file and the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from medpipe.errors import ConfigError

# Verification SOP Class and the storage classes the routes may name are plain UIDs; no table of names here.
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class Code:
    """A coded concept for the SR finding: (coding scheme designator, code value, code meaning)."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Route:
    """Which instances one model takes. Empty lists mean "any"; every non-empty criterion must match."""

    model: str
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    series_description: Optional[str] = None  # a regular expression, searched case-insensitively
    # class name -> code of the SR finding; classes not listed get a local code (scheme 99MEDPIPE, value = name)
    codes: dict[str, Code] = field(default_factory=dict)


@dataclass(frozen=True)
class RetryConfig:
    initial_seconds: float = 1.0
    max_seconds: float = 10.0  # a destination back after an outage gets its results within this many seconds


@dataclass(frozen=True)
class PacsConfig:
    spool: str = "runs/pacs-spool"  # received instances and pending results; keep it on a durable disk
    calling_aets: tuple[str, ...] = ()  # DIMSE allow-list; empty = the SCP does not start (nothing open by default)
    stable_seconds: float = 5.0  # a study is processed when no new instance arrived for this long
    # the study's answer: "model" = the rule in the model version's assets (medpipe/study.py: abnormal-first for tasks
    # with a normal class); max / mean only when named here explicitly
    aggregation: Literal["model", "max", "mean"] = "model"
    # a study's received instances are kept this long after its last result, so a late series re-scores the whole
    # study (SPOOL/studies/); then removed (PHI on disk only as long as needed)
    study_retention_hours: float = 24.0
    scan_seconds: float = 0.5  # how often the spool is looked at
    deadline_seconds: float = 30.0  # per inference call
    max_instance_mb: int = 256  # larger instances are refused (DIMSE status A700, STOW-RS 413)
    # free space the spool's file system keeps: an instance that would leave less is refused with the retryable
    # DIMSE A700 / HTTP 507 (the sender keeps it and retries), never half-written
    reserve_mb: int = 512
    # a study whose processing failed (or crashed the gateway) this many times moves to SPOOL/quarantine/
    quarantine_after: int = 3
    secondary_capture: bool = False  # also send the Grad-CAM overlay (models with an `explain` signature)
    webhook: Optional[str] = None  # URL: a JSON summary per result is POSTed here (apps)
    retry: RetryConfig = field(default_factory=RetryConfig)
    routes: tuple[Route, ...] = ()


def load_pacs_config(path: Optional[str]) -> PacsConfig:
    """The YAML file -> PacsConfig (None -> defaults: no routes, so nothing is inferred)."""
    from medpipe.config import _build  # the task configs' typed loader: one set of rules for every YAML file

    if path is None:
        return PacsConfig()
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"PACS config {file} does not exist (see config/pacs.yaml for an example)")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    raw = dict(raw)
    routes = raw.pop("routes", []) or []
    codes = [route.pop("codes", {}) or {} if isinstance(route, dict) else {} for route in routes]
    config = _build(PacsConfig, {**raw, "routes": routes}, str(file), "")
    for key in ("max_instance_mb", "quarantine_after"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{file}: {key} must be at least 1 (it is {getattr(config, key)})")
    if config.reserve_mb < 0:
        raise ConfigError(f"{file}: reserve_mb must be 0 or more MB of free space (it is {config.reserve_mb})")
    built = []
    for index, (route, table) in enumerate(zip(config.routes, codes)):
        parsed = {name: _code(value, str(file), f"routes[{index}].codes.{name}") for name, value in table.items()}
        if route.series_description is not None:
            try:
                re.compile(route.series_description)
            except re.error as exc:
                raise ConfigError(f"{file}: routes[{index}].series_description is not a regular expression: "
                                  f"{exc}") from None
        built.append(Route(route.model, tuple(m.upper() for m in route.modalities),
                           tuple(b.upper() for b in route.body_parts), route.sop_classes, route.series_description,
                           parsed))
    from dataclasses import replace

    return replace(config, routes=tuple(built))


def _code(value, file: str, key: str) -> Code:
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, str) for v in value)):
        raise ConfigError(f"{file}: {key} must be [scheme, value, meaning], e.g. [SCT, 393563007, Glioma]")
    return Code(*value)


# ---------------------------------------------------------------------------------------------------------------
# routing: a pure function of a few header values
@dataclass(frozen=True)
class RoutingKeys:
    """The header values routing looks at (read from the instance; never logged)."""

    modality: str = ""
    body_part: str = ""
    sop_class: str = ""
    series_description: str = ""


def routing_keys(ds) -> RoutingKeys:
    def text(keyword: str) -> str:
        value = ds.get(keyword)
        return str(value).strip() if value is not None else ""

    return RoutingKeys(text("Modality").upper(), text("BodyPartExamined").upper(), text("SOPClassUID"),
                       text("SeriesDescription"))


def route_matches(route: Route, keys: RoutingKeys) -> bool:
    if route.modalities and keys.modality not in route.modalities:
        return False
    if route.body_parts and keys.body_part not in route.body_parts:
        return False
    if route.sop_classes and keys.sop_class not in route.sop_classes:
        return False
    if route.series_description is not None and not re.search(route.series_description, keys.series_description,
                                                               re.IGNORECASE):
        return False
    return True


def models_for(routes: tuple[Route, ...], keys: RoutingKeys) -> list[str]:
    """Every model whose route takes this instance (in config order, each once); [] = not routed."""
    out: list[str] = []
    for route in routes:
        if route_matches(route, keys) and route.model not in out:
            out.append(route.model)
    return out


def route_for(routes: tuple[Route, ...], model: str) -> Optional[Route]:
    return next((route for route in routes if route.model == model), None)
