"""The training window: which ingested partitions a training run learns from, checked and recorded.

    python -m medpipe.window --config brain_mri [--set training.partitions='{last: 3}'] \
        --output WINDOW_DIR PARTITION_DIR...        # partitions oldest first (the DAG orders them)

`training.partitions` in the task config chooses the window among the dataset's partitions:

    partitions: all                 # every partition (default)
    partitions: {last: 3}           # the 3 newest
    partitions: [2026-11-01, 2026-11-02]   # exactly these (each must exist)

plus, when `training.include_feedback` is true (default), every partition whose name starts with `feedback`
(radiologists' confirmed labels, `medpipe feedback` -> `medpipe_ingest`), whatever the window.

Every partition in the window must share one schema (labels, task, image size, channels: the schema fingerprint);
a window mixing 64 px and 160 px partitions is refused (exit 2). WINDOW_DIR becomes an ingest-shaped folder the
trainer reads like any partition: `schema.json` and one symlink per shard, named `<split>-<index>-<partition>-...`,
and `window.json`, which records the exact partitions, their ingest time and a fingerprint of each (sha256 over the
shard bytes and stats.json). The last stdout line is a JSON summary (window, newest partition, image size, channels).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from medpipe.config import SHIFT_SPLITS, SPLITS
from medpipe.errors import ConfigError, DataError

FEEDBACK_PREFIX = "feedback"
WINDOW_FILE = "window.json"


def parse_window(spec: Any, where: str = "training.partitions") -> tuple[str, Any]:
    """("all", None) | ("last", N) | ("list", (names...)); ConfigError for anything else."""
    if spec in (None, "all"):
        return "all", None
    if isinstance(spec, dict) and set(spec) == {"last"}:
        count = spec["last"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"{where}: `last` must be a positive integer, got {count!r}")
        return "last", count
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(name, str) and name for name in spec):
        return "list", tuple(spec)
    raise ConfigError(f"{where} is {spec!r}; expected `all`, `{{last: N}}` or a list of partition names")


def is_feedback(name: str) -> bool:
    return name.startswith(FEEDBACK_PREFIX)


def select_partitions(ordered: Sequence[str], spec: Any, include_feedback: bool = True) -> list[str]:
    """The window's partition names, oldest first. `ordered` lists every available partition oldest first."""
    kind, value = parse_window(spec)
    regular = [name for name in ordered if not is_feedback(name)]
    if kind == "all":
        chosen = regular
    elif kind == "last":
        chosen = regular[-value:]
    else:
        missing = [name for name in value if name not in ordered]
        if missing:
            raise DataError(f"training.partitions names {missing}, which are not ingested partitions "
                            f"(available: {list(ordered)})")
        chosen = [name for name in ordered if name in value]
    if include_feedback:
        chosen += [name for name in ordered if is_feedback(name) and name not in chosen]
    if not chosen:
        raise DataError(f"the training window {spec!r} selects no partition (available: {list(ordered)})")
    return chosen


def partition_fingerprint(directory: Path) -> dict[str, Any]:
    """What identifies a partition's content: schema fingerprint and sha256 over stats.json and every shard."""
    digest = hashlib.sha256()
    shards = sorted(directory.glob("*.tfrecord.gz"))
    for path in [directory / "stats.json", *shards]:
        if not path.is_file():
            continue
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    schema = json.loads((directory / "schema.json").read_text(encoding="utf-8"))
    stats_file = directory / "stats.json"
    stats = json.loads(stats_file.read_text(encoding="utf-8")) if stats_file.is_file() else {}
    return {"schema_fingerprint": schema.get("fingerprint"), "sha256": digest.hexdigest(),
            "shards": len(shards), "written": stats.get("written")}


def check_one_schema(directories: Sequence[Path]) -> dict:
    """The schema.json body all partitions share; DataError naming the odd ones out otherwise."""
    bodies = {}
    for directory in directories:
        schema_file = directory / "schema.json"
        if not schema_file.is_file():
            raise DataError(f"{directory} is not a complete ingested partition (no schema.json)")
        bodies[directory.name] = json.loads(schema_file.read_text(encoding="utf-8"))
    fingerprints = {name: body.get("fingerprint") for name, body in bodies.items()}
    if len(set(fingerprints.values())) > 1:
        described = {name: f"{body['image']['height']} px, {body['image']['channels']} ch, labels {body['labels']}"
                     for name, body in bodies.items()}
        raise DataError(f"the partitions of the training window do not share one schema: {described}; re-ingest "
                        "the odd ones with the same config or narrow training.partitions")
    return next(iter(bodies.values()))


def build_window(directories: Sequence[Path], output: Path, ingested_at: dict[str, str] | None = None) -> dict:
    """Write the window folder (schema.json, shard symlinks, window.json); returns the window.json body."""
    schema = check_one_schema(directories)
    staging = output.with_name(f".{output.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "schema.json").write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")
    for index, directory in enumerate(directories):
        for split in SPLITS + SHIFT_SPLITS:
            for shard in sorted(directory.glob(f"{split}-*.tfrecord.gz")):
                rest = shard.name[len(split) + 1:]
                os.symlink(shard.resolve(), staging / f"{split}-{index:03d}-{directory.name}-{rest}")
    record = {
        "partitions": [{"name": directory.name, "path": str(directory.resolve()),
                        "ingested_at": (ingested_at or {}).get(directory.name),
                        **partition_fingerprint(directory)} for directory in directories],
        "schema_fingerprint": schema.get("fingerprint"),
        "image_size": int(schema["image"]["height"]),
        "channels": int(schema["image"]["channels"]),
    }
    (staging / WINDOW_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if output.exists():
        shutil.rmtree(output)
    os.replace(staging, output)
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medpipe.window", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="task config (name or YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", required=True, help="window folder to write (replaced)")
    parser.add_argument("--ingested-at", default="{}", help="JSON {partition: ingest time} from the asset events")
    parser.add_argument("partitions", nargs="+", help="every available partition folder, oldest first")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from medpipe.config import load_config

    args = build_parser().parse_args(argv)
    config = load_config(args.config, args.overrides)
    by_name = {Path(path).name: Path(path) for path in args.partitions}
    chosen = select_partitions(list(by_name), config.training.partitions, config.training.include_feedback)
    record = build_window([by_name[name] for name in chosen], Path(args.output), json.loads(args.ingested_at))
    print(json.dumps({"window": str(Path(args.output).resolve()), "partitions": chosen,
                      "newest": str(by_name[[n for n in chosen if not is_feedback(n)][-1]]
                                    if any(not is_feedback(n) for n in chosen) else by_name[chosen[-1]]),
                      "image_size": record["image_size"], "channels": record["channels"]}))
    return 0


if __name__ == "__main__":
    from medpipe.cli import module_main

    module_main(main)
