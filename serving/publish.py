"""`medpipe publish`: export a blessed run as a new version of a TF Serving model, or move a version label.

    medpipe publish --run RUN_DIR --repository REPO --model-name NAME [--label stable|canary] [--server HOST:8500]
    medpipe publish --repository REPO --model-name NAME --label stable --version V      # promote / roll back

A version is written to REPO/NAME/.tmp-*/ and renamed into place (TF Serving never sees half a model); its
number is the UNIX time in seconds, strictly increasing; an existing version is never overwritten. An unblessed run
(blessing.json missing or blessed=false) is refused unless --force. REPO/models.config is rewritten atomically;
with --server the running server (medpipe's or real TF Serving) reloads it via ModelService.HandleReloadConfigRequest.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from medpipe.cli import module_main
from medpipe.errors import DataError, MedpipeError
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
    if blessing is not None and blessing.get("blessed") is True:
        return
    why = ("no blessing.json (run `medpipe evaluate` first)" if blessing is None
           else "not blessed: " + "; ".join(blessing.get("reasons", [])) or "blessed=false")
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


def update_config(repository: Path, model_name: str, labels: dict[str, int], base_path: str | None,
                  policy: str = "latest", num_versions: int = 1):
    config_path = repository / repo_lib.CONFIG_FILE
    config = repo_lib.read_config(config_path)
    existing = repo_lib.find_model(config, model_name)
    if existing is not None and existing.model_version_policy.WhichOneof("policy_choice") == "all":
        policy = "all"
    on_disk = repo_lib.versions_on_disk(repo_lib.model_dir(repository, model_name))
    newest = on_disk[-num_versions:] if on_disk else []
    repo_lib.upsert_model(config, model_name, base_path or str((repository / model_name).resolve()), policy,
                          num_versions, versions_for_specific=newest, labels=labels)
    repo_lib.write_config(config_path, config)
    return config


def reload_server(server: str, config, timeout: float, connection=None) -> None:
    """ModelService.HandleReloadConfigRequest: the same call works against real TF Serving."""
    import grpc
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

    from serving.client import Connection

    request = model_management_pb2.ReloadConfigRequest(config=config)
    connection = connection or Connection()
    with connection.channel(server) as channel:
        try:
            response = model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
                request, timeout=timeout, metadata=connection.metadata())
        except grpc.RpcError as exc:
            raise MedpipeError(f"server {server} did not reload: {exc.code().name}: {exc.details()}") from exc
    if response.status.error_code != 0:
        raise MedpipeError(f"server {server} refused the new config: {response.status.error_message}")
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
        print(f"label {args.label} of {args.model_name} -> version {args.version}")
    else:
        raise DataError("nothing to do: pass --run RUN_DIR to publish, or --label L --version V to move a label")
    config = update_config(repository, args.model_name, labels, args.base_path, policy, num_versions)
    if args.server:
        from serving.client import connection_from_args

        reload_server(args.server, config, args.timeout, connection_from_args(args))
    return 0


if __name__ == "__main__":
    module_main(main)
