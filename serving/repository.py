"""The TF Serving model repository on disk: REPO/NAME/<int version>/ folders and REPO/models.config.

models.config is read and written by medpipe.models_config (the real proto, shared with the gate). Note for real
TF Serving: a version label can only point at a version that is already loaded, unless the server runs with
`--allow_version_labels_for_unavailable_models`; medpipe publish therefore lists every labelled version in a
`specific` policy, and with real TF Serving the safe order is: publish (version loads), then move the label.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from medpipe.errors import ConfigError, DataError
# re-exported for repo_lib.* callers (publish, manager, demo) and tests
from medpipe.models_config import CONFIG_FILE, find_model, parse_config_text, read_config, write_config  # noqa: F401

LABEL_PATTERN = re.compile(r"^[a-zA-Z0-9_]+$")


def versions_on_disk(model_dir: Path) -> list[int]:
    """Integer-named child folders, ascending (TF Serving ignores anything else, including our temp folders)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def folder_fingerprint(folder: Path) -> tuple:
    """(relative path, size, mtime) of everything under FOLDER: it changes while a copy into the folder progresses."""
    entries = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                stat = os.stat(os.path.join(root, name))
            except FileNotFoundError:  # removed while we walked: the next poll sees the new state
                continue
            entries.append((os.path.relpath(os.path.join(root, name), folder), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


def next_version(model_dir: Path, now: float | None = None) -> int:
    """UNIX seconds, strictly greater than every existing version (two publishes in one second stay ordered)."""
    existing = versions_on_disk(model_dir)
    candidate = int(now if now is not None else time.time())
    return max([candidate] + [v + 1 for v in existing])


def upsert_model(config, name: str, base_path: str, policy: str = "latest", num_versions: int = 1,
                 versions_for_specific: list[int] | None = None, labels: dict[str, int] | None = None):
    """Create or update NAME's entry: base path, version policy and labels (existing labels kept unless replaced).

    With labels, a `latest` policy becomes `specific` over the newest num_versions plus every labelled version, so
    a label never points at a version the policy would unload.
    """
    entry = find_model(config, name)
    if entry is None:
        entry = config.model_config_list.config.add()
        entry.name = name
    entry.base_path = base_path
    entry.model_platform = "tensorflow"
    merged = dict(entry.version_labels)
    merged.update(labels or {})
    for label in merged:
        if not LABEL_PATTERN.match(label):
            raise ConfigError(f"version label {label!r} is not allowed: use letters, digits and _ only")
    entry.ClearField("version_labels")
    for label, version in sorted(merged.items()):
        entry.version_labels[label] = int(version)
    entry.ClearField("model_version_policy")
    if policy == "all":
        entry.model_version_policy.all.SetInParent()
    elif policy == "specific" or merged:
        wanted = set(versions_for_specific or []) | set(merged.values())
        if not wanted:
            raise ConfigError(f"model {name}: a specific version policy needs at least one version")
        entry.model_version_policy.specific.versions.extend(sorted(wanted))
    else:
        entry.model_version_policy.latest.num_versions = num_versions
    return entry


def model_dir(repository: Path, name: str) -> Path:
    if not re.match(r"^[A-Za-z0-9_.-]+$", name):
        raise ConfigError(f"model name {name!r} is not a safe folder name (letters, digits, _ . - only)")
    return repository / name


def require_version(repository: Path, name: str, version: int) -> None:
    """VERSION of NAME exists and has the files of a SavedModel (what can be checked without a server)."""
    folder = model_dir(repository, name) / str(version)
    if version not in versions_on_disk(model_dir(repository, name)):
        raise DataError(f"{folder} does not exist; versions on disk: "
                        f"{versions_on_disk(model_dir(repository, name)) or 'none'}")
    missing = [part for part in ("saved_model.pb", "variables") if not (folder / part).exists()]
    if missing:
        raise DataError(f"{folder} is not a complete SavedModel (missing {', '.join(missing)}); publish it again "
                        "with `medpipe publish --run`, or pick another --version")
