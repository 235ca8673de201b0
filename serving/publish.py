"""`medpipe publish`: export a blessed run as a new version of a TF Serving model, or move a version label.

    medpipe publish --run RUN_DIR --repository REPO --model-name NAME [--label stable|canary] [--server HOST:8500]
    medpipe publish --repository REPO --model-name NAME --label stable --version V      # promote / roll back

A version is written to REPO/NAME/.tmp-*/ and renamed into place (TF Serving never sees half a model); its
number is the UNIX time in seconds, strictly increasing; an existing version is never overwritten. An unblessed run
(RUN_DIR/blessing.json missing, blessed=false, or a verdict not made on the test split) is refused unless --force.
REPO/models.config is rewritten atomically. With --server the running server (medpipe's or real TF Serving) gets the
change first, via ModelService.HandleReloadConfigRequest: a label moves only after its target version is loaded and
AVAILABLE there (GetModelStatus); when the server refuses, models.config stays as it was and the server keeps its
previous config.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from medpipe.cli import module_main
from medpipe.config import GATE_SPLITS
from medpipe.errors import DataError, MedpipeError
from medpipe.models_config import version_labels
from serving import repository as repo_lib

log = logging.getLogger("medpipe.publish")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medpipe publish",
        description="Export a blessed training run as a versioned SavedModel into a TF Serving model repository, "
        "or move a version label (promote a canary, roll back stable) with --label and --version.")
    parser.add_argument("--run", help="training run directory (model.keras, config.yaml, blessing.json)")
    parser.add_argument("--repository", required=True, help="model repository (TF Serving base path parent)")
    parser.add_argument("--model-name", required=True, help="model name clients pass in ModelSpec.name")
    parser.add_argument("--label", help="version label to point at the new (or --version) version, e.g. stable")
    parser.add_argument("--version", type=int, help="with --label and no --run: move the label to this version")
    parser.add_argument("--server", help="HOST:PORT of a running server's gRPC port: ask it to reload models.config")
    from serving.client import add_connection_options

    add_connection_options(parser)  # TLS / mTLS / bearer token towards --server
    parser.add_argument("--force", action="store_true", help="publish even if the run is not blessed (dangerous)")
    parser.add_argument("--base-path", help="base_path written to models.config as the server sees it "
                        "(e.g. /models/NAME inside the tensorflow/serving container); default: the absolute path")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds for the reload request")
    return parser


def check_blessing(run_dir: Path, force: bool) -> None:
    from models.export import read_blessing

    blessing = read_blessing(run_dir)
    split = ((blessing or {}).get("data") or {}).get("split")
    if blessing is not None and blessing.get("blessed") is True and split in GATE_SPLITS:
        return
    if blessing is None:
        why = "no blessing.json (run `medpipe evaluate` first)"
    elif split not in GATE_SPLITS:
        why = (f"its verdict was made on {split or 'unrecorded data'}, not the test split (test, or test_shift for "
               f"a task with a shift-aware holdout: run `medpipe evaluate`, which takes evaluation.gate_split)")
    else:
        why = "not blessed: " + ("; ".join(blessing.get("reasons", [])) or "blessed=false")
    if not force:
        raise DataError(f"refusing to publish {run_dir}: {why}. Fix the model, or pass --force to override.")
    banner = "!" * 78
    print(f"{banner}\nWARNING: publishing an UNBLESSED model ({why}) because --force was given.\n"
          f"Never route patients to this version.\n{banner}", file=sys.stderr)


def publish_run(run_dir: Path, repository: Path, model_name: str) -> int:
    """Export into a temp folder beside the versions, then rename: returns the new version."""
    from models.export import export_saved_model

    target_dir = repo_lib.model_dir(repository, model_name)
    target_dir.mkdir(parents=True, exist_ok=True)
    version = repo_lib.next_version(target_dir)
    tmp = target_dir / f".tmp-{version}-{os.getpid()}"
    try:
        export_saved_model(run_dir, tmp, model_name=model_name)
        final = target_dir / str(version)
        if final.exists():  # a concurrent publisher got this second: never overwrite
            raise DataError(f"{final} appeared while exporting; not overwriting it. Run publish again.")
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("published %s as %s version %d", run_dir, model_name, version)
    return version


def plan_config(previous, repository: Path, model_name: str, labels: dict[str, int], base_path: str | None,
                policy: str = "latest", num_versions: int = 1):
    """PREVIOUS (a ModelServerConfig, left untouched) with NAME's entry updated: base path, policy, LABELS."""
    config = copy.deepcopy(previous)
    existing = repo_lib.find_model(config, model_name)
    if existing is not None and existing.model_version_policy.WhichOneof("policy_choice") == "all":
        policy = "all"
    on_disk = repo_lib.versions_on_disk(repo_lib.model_dir(repository, model_name))
    newest = on_disk[-num_versions:] if on_disk else []
    repo_lib.upsert_model(config, model_name, base_path or str((repository / model_name).resolve()), policy,
                          num_versions, versions_for_specific=newest, labels=labels)
    return config


def loading_config(previous, final, model_name: str):
    """FINAL's versions of NAME loaded under PREVIOUS's labels: the first step of a label move, which loads the
    target version without pointing anything at it."""
    config = copy.deepcopy(final)
    entry, old_labels = repo_lib.find_model(config, model_name), version_labels(previous, model_name)
    entry.ClearField("version_labels")
    entry.version_labels.update(old_labels)
    if entry.model_version_policy.WhichOneof("policy_choice") == "specific":
        keep = set(entry.model_version_policy.specific.versions) | set(old_labels.values())
        entry.model_version_policy.specific.ClearField("versions")
        entry.model_version_policy.specific.versions.extend(sorted(keep))
    return config


def update_config(repository: Path, model_name: str, labels: dict[str, int], base_path: str | None,
                  policy: str = "latest", num_versions: int = 1):
    """Plan the new models.config and write it (atomically); no server involved."""
    config_path = repository / repo_lib.CONFIG_FILE
    config = plan_config(repo_lib.read_config(config_path), repository, model_name, labels, base_path, policy,
                         num_versions)
    repo_lib.write_config(config_path, config)
    return config


def reload_server(stub, server: str, config, timeout: float, metadata=()) -> None:
    """ModelService.HandleReloadConfigRequest: the same call works against real TF Serving."""
    import grpc
    from tensorflow_serving.apis import model_management_pb2

    try:
        response = stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config),
                                                  timeout=timeout, metadata=list(metadata))
    except grpc.RpcError as exc:
        raise MedpipeError(f"server {server} did not reload: {exc.code().name}: {exc.details()}") from exc
    if response.status.error_code != 0:
        raise MedpipeError(f"server {server} refused the new config: {response.status.error_message}")


def wait_available(stub, server: str, model_name: str, version: int, timeout: float, metadata=()) -> None:
    """Until version VERSION of MODEL is AVAILABLE on the server; MedpipeError when it failed to load or the
    deadline passed. Asks GetModelStatus, so it works against real TF Serving too."""
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model_name
    request.model_spec.version.value = version
    deadline, state = time.monotonic() + timeout, "unknown to the server"
    while True:
        try:
            response = stub.GetModelStatus(request, timeout=max(1.0, deadline - time.monotonic()),
                                           metadata=list(metadata))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise MedpipeError(f"server {server}: status of {model_name} version {version}: "
                                   f"{exc.code().name}: {exc.details()}") from exc
        else:
            status = next((s for s in response.model_version_status if s.version == version), None)
            if status is not None:
                state = get_model_status_pb2.ModelVersionStatus.State.Name(status.state)
                if state == "AVAILABLE":
                    return
                if state == "END" and status.status.error_code != 0:  # END without an error: not loaded yet
                    raise MedpipeError(f"version {version} of {model_name} failed to load on {server}: "
                                       f"{status.status.error_message}")
        if time.monotonic() > deadline:
            raise MedpipeError(f"version {version} of {model_name} is not AVAILABLE on {server} after {timeout:g} s "
                               f"(state: {state})")
        time.sleep(0.2)


def apply_on_server(server: str, previous, config, model_name: str, labels: dict[str, int], timeout: float,
                    connection=None) -> None:
    """Make CONFIG live on SERVER, moving labels only to versions the server has loaded: first load the targets
    under the old labels, check each is AVAILABLE (GetModelStatus), then move the labels. On a refusal the server is
    given PREVIOUS back, and the caller leaves models.config as it was."""
    from tensorflow_serving.apis import model_service_pb2_grpc

    from serving.client import Connection

    connection = connection or Connection()
    metadata = connection.metadata()
    with connection.channel(server) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        if labels:
            reload_server(stub, server, loading_config(previous, config, model_name), timeout, metadata)
            try:
                for version in sorted(set(labels.values())):
                    wait_available(stub, server, model_name, version, timeout, metadata)
            except MedpipeError:
                if repo_lib.find_model(previous, model_name) is not None:
                    try:
                        reload_server(stub, server, previous, timeout, metadata)
                    except MedpipeError as exc:
                        log.warning("could not give the server its previous config back: %s", exc)
                raise
        reload_server(stub, server, config, timeout, metadata)
    log.info("server %s reloaded models.config", server)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    repository = Path(args.repository)
    labels: dict[str, int] = {}
    policy, num_versions = "latest", 1
    if args.run:
        if args.version is not None:
            raise DataError("--version moves a label to an existing version; do not combine it with --run")
        run_dir = Path(args.run)
        if not (run_dir / "model.keras").is_file():
            raise DataError(f"{run_dir} is not a training run (no model.keras); pass the directory of `medpipe train`")
        check_blessing(run_dir, args.force)
        from medpipe.config import load_config

        run_config = load_config(run_dir / "config.yaml")
        policy, num_versions = run_config.serving.version_policy, run_config.serving.num_versions
        version = publish_run(run_dir, repository, args.model_name)
        if args.label:
            labels[args.label] = version
        print(f"published {args.model_name} version {version} to {repository / args.model_name / str(version)}")
    elif args.label and args.version is not None:
        repo_lib.require_version(repository, args.model_name, args.version)
        labels[args.label] = args.version
    else:
        raise DataError("nothing to do: pass --run RUN_DIR to publish, or --label L --version V to move a label")
    config_path = repository / repo_lib.CONFIG_FILE
    previous = repo_lib.read_config(config_path)
    config = plan_config(previous, repository, args.model_name, labels, args.base_path, policy, num_versions)
    if args.server:  # the server first: models.config changes only once the server took the change
        try:
            from serving.client import connection_from_args

            apply_on_server(args.server, previous, config, args.model_name, labels, args.timeout,
                            connection_from_args(args))
        except MedpipeError as exc:
            moved = ", ".join(f"{label} -> {version}" for label, version in labels.items())
            raise MedpipeError(f"refused{' to move ' + moved if moved else ''}: {exc}. {config_path} is unchanged "
                               "and the server keeps its previous configuration.") from exc
    repo_lib.write_config(config_path, config)
    if args.version is not None:
        print(f"label {args.label} of {args.model_name} -> version {args.version}")
    return 0


if __name__ == "__main__":
    module_main(main)
