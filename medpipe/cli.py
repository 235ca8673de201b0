"""The `medpipe` command: one subcommand per stage, each forwarding its arguments to the stage's own `main`.

Stages are imported only when chosen, so `medpipe --help` answers instantly and `medpipe ingest` never loads
TensorFlow. Every stage is also runnable as a module (`python -m beam_pipelines.ingest ...`), which is how Airflow
tasks and Beam workers launch them.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Sequence

from medpipe.errors import MedpipeError

# subcommand -> (module with main(argv), one-line description)
STAGES: dict[str, tuple[str, str]] = {
    "ingest": ("beam_pipelines.ingest", "Beam pipeline: images/DICOM -> validated, de-identified, split TFRecords"),
    "train": ("models.train", "train a Keras classifier on ingested TFRecords with MirroredStrategy"),
    "evaluate": ("models.evaluate", "metrics, plots, Grad-CAM, report.html and the quality gate (blessing.json)"),
    "publish": ("serving.publish", "export a blessed run as a versioned SavedModel into a TF Serving repository"),
    "serve": ("serving.server", "TF Serving-compatible gRPC (8500) + REST (8501) server over a model repository"),
    "gateway": ("serving.gateway.server", "the clinical gateway: authenticated, audited gRPC + REST front door to TF Serving"),
    "viewer-users": ("serving.viewer.users", "manage the web viewer's local users file (scrypt-hashed passwords)"),
    "audit": ("serving.gateway.audit", "check the gateway's hash-chained audit log (medpipe audit verify FILE)"),
    "predict": ("serving.client", "classify DICOM/PNG/JPEG files against a served model over gRPC or REST"),
    "monitor": ("medpipe.monitoring", "drift and live-accuracy report from the gateway's request log (alerts over thresholds)"),
    "feedback": ("medpipe.feedback", "radiologists' confirmed labels for served studies -> a labelled partition"),
    "demo": ("medpipe.demo", "the whole chain on the sample in sample_data/, end to end, in a few minutes"),
}

USAGE = "medpipe <command> [options]   (medpipe <command> --help for the command's options)"


def _help_text() -> str:
    width = max(map(len, STAGES))
    lines = [f"usage: {USAGE}", "", "Medical imaging pipelines: DICOM and image files in, a served classifier out.", ""]
    lines.append("commands:")
    lines += [f"  {name.ljust(width)}  {description}" for name, (_, description) in STAGES.items()]
    lines += ["", "options:", "  -h, --help  show this message and exit", "  --version   print medpipe's version"]
    return "\n".join(lines)


def configure_logging(level: int = logging.INFO) -> None:
    """Plain timestamped lines: readable on a terminal and in Airflow task logs alike."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=False)


def run_stage(module_name: str, argv: Sequence[str]) -> int:
    """Import a stage lazily and run its main; user-facing errors become one line on stderr and exit status 2."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"medpipe: the stage {module_name} cannot be imported ({exc}); is .venv set up? run `make setup`",
              file=sys.stderr)
        return 2
    try:
        return int(module.main(list(argv)) or 0)
    except MedpipeError as exc:
        print(f"medpipe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medpipe: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_help_text())
        return 0 if args else 2
    if args[0] == "--version":
        from medpipe import __version__

        print(f"medpipe {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in STAGES:
        print(f"medpipe: unknown command {command!r}; choose one of: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    configure_logging()
    return run_stage(STAGES[command][0], rest)


if __name__ == "__main__":
    sys.exit(main())


def module_main(main_function) -> None:  # pragma: no cover - thin shell
    """`if __name__ == "__main__": module_main(main)` for stage modules run with `python -m`:
    the same logging and the same one-line errors as the `medpipe` command."""
    configure_logging()
    try:
        code = main_function(sys.argv[1:])
    except MedpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(int(code or 0))
