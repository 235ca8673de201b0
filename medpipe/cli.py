"""The `medpipe` command: one subcommand per stage, each forwarding its arguments to the stage's own `main`.

Stages are imported only when chosen, so `medpipe --help` answers instantly and `medpipe ingest` never loads
TensorFlow. Every stage is also runnable as a module (`python -m beam_pipelines.ingest ...`), which is how Airflow
tasks and Beam workers launch them.

Quiet by default: the terminal gets medpipe's own progress and result lines; everything else written to stderr
(Beam workers, TensorFlow's C++ and absl banners, library warnings) goes to a log file named at the end
(`--log-file FILE`, default $MEDPIPE_LOG_DIR or TMPDIR/medpipe-logs-UID/). `--verbose` shows all of it on the
terminal instead. Both flags are taken by this module, before the stage parses its own options.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

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
    "audit": ("serving.gateway.audit", "check the gateway's chained audit log (medpipe audit verify FILE [--key KEY --anchor ANCHOR])"),
    "predict": ("serving.client", "classify DICOM/PNG/JPEG files against a served model over gRPC or REST"),
    "monitor": ("serving.monitoring", "drift and live-accuracy report from the gateway's request log (alerts over thresholds)"),
    "feedback": ("serving.feedback", "radiologists' confirmed labels for served studies -> a labelled partition"),
    "demo": ("serving.demo", "the whole chain on the sample in sample_data/, end to end, in a few minutes"),
}

USAGE = "medpipe <command> [options]   (medpipe <command> --help for the command's options)"


def _help_text() -> str:
    width = max(map(len, STAGES))
    lines = [f"usage: {USAGE}", "", "Medical imaging pipelines: DICOM and image files in, a served classifier out.", ""]
    lines.append("commands:")
    lines += [f"  {name.ljust(width)}  {description}" for name, (_, description) in STAGES.items()]
    lines += ["", "options:", "  -h, --help  show this message and exit", "  --version   print medpipe's version",
              "", "options of every command:",
              "  --verbose        framework output (Beam workers, TensorFlow, absl) on the terminal too",
              "  --log-file FILE  where that output goes otherwise (default: a file named when the command ends)",
              "", "exit status: 0 done; 1 done with a finding (monitor alert, predict: a file failed); "
              "2 refused or failed; 3 no-go (evaluate: not blessed; ingest: nothing written); 130 interrupted"]
    return "\n".join(lines)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Progress and results: the terminal's share. A stage run as `python -m ...` logs under __main__.
OWN_LOGGERS = ("medpipe", "models", "serving", "beam_pipelines", "__main__")


def configure_logging(level: int = logging.INFO) -> None:
    """Plain timestamped lines: readable on a terminal and in Airflow task logs alike."""
    logging.basicConfig(level=level, format=LOG_FORMAT, force=False)


def split_console_flags(argv: Sequence[str]) -> tuple[bool, Optional[str], list[str]]:
    """(--verbose given, --log-file value or None, the stage's own arguments)."""
    verbose, log_file, rest, items = False, None, [], list(argv)
    index = 0
    while index < len(items):
        arg = items[index]
        if arg == "--":
            rest += items[index:]
            break
        if arg == "--verbose":
            verbose = True
        elif arg == "--log-file" and index + 1 < len(items):
            log_file, index = items[index + 1], index + 1
        elif arg.startswith("--log-file="):
            log_file = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        index += 1
    return verbose, log_file, rest


def default_log_file(command: str) -> str:
    folder = os.environ.get("MEDPIPE_LOG_DIR") or os.path.join(tempfile.gettempdir(), f"medpipe-logs-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return os.path.join(folder, f"{command}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log")


class Console:
    """Quiet mode for one command: file descriptor 2 (what C++ code, absl and child processes such as Beam workers
    write to) goes to the log file; medpipe's own log lines and Python's sys.stderr (errors, tracebacks) stay on
    the terminal. Verbose mode: the plain logging setup, everything on the terminal."""

    def __init__(self, command: str, verbose: bool = False, log_file: Optional[str] = None):
        self.command, self.verbose, self.path = command, verbose, log_file
        self._saved_fd: Optional[int] = None

    def __enter__(self) -> "Console":
        if self.verbose:
            configure_logging()
            return self
        self.path = self.path or default_log_file(self.command)
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._saved_fd = os.dup(2)
        os.dup2(fd, 2)
        os.close(fd)
        self._saved_stderr = sys.stderr
        sys.stderr = self.terminal = os.fdopen(os.dup(self._saved_fd), "w", buffering=1, errors="replace")
        to_file = logging.FileHandler(self.path, encoding="utf-8")
        to_terminal = logging.StreamHandler(self.terminal)
        to_terminal.addFilter(lambda record: record.name.split(".")[0] in OWN_LOGGERS)
        for handler in (to_file, to_terminal):
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.basicConfig(level=logging.INFO, handlers=[to_file, to_terminal], force=True)
        logging.captureWarnings(True)  # library warnings are chatter too: into the file
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._saved_fd is None:
            return
        if exc_type is not SystemExit:  # --help and usage errors ran nothing worth a log
            print(f"medpipe {self.command}: log: {self.path}", file=self.terminal)
        self.terminal.flush()
        logging.captureWarnings(False)
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        sys.stderr = self._saved_stderr
        self._saved_fd = None


def run_stage(module_name: str, argv: Sequence[str], command: Optional[str] = None) -> int:
    """Import a stage lazily and run its main, quietly unless --verbose; user-facing errors become one line on
    stderr and their exit status (2, or 3 for a no-go)."""
    verbose, log_file, argv = split_console_flags(argv)
    with Console(command or module_name.rsplit(".", 1)[-1], verbose, log_file):
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
            return exc.exit_code
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
    return run_stage(STAGES[command][0], rest, command)


def module_main(main_function) -> None:  # pragma: no cover - thin shell
    """`if __name__ == "__main__": module_main(main)` for stage modules run with `python -m`:
    the same quiet console, the same one-line errors and exit statuses as the `medpipe` command."""
    module = main_function.__module__
    if module == "__main__":  # python -m serving.client: the module's own name is in its spec
        module = getattr(sys.modules["__main__"].__spec__, "name", module)
    command = next((name for name, (path, _) in STAGES.items() if path == module), module.rsplit(".", 1)[-1])
    verbose, log_file, argv = split_console_flags(sys.argv[1:])
    with Console(command, verbose, log_file):
        try:
            code = main_function(argv)
        except MedpipeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            code = exc.exit_code
    exit_process(code)


def exit_process(code: Optional[int]) -> None:  # pragma: no cover - ends the process
    """Exit a command-line process without the interpreter's teardown collection. At exit CPython garbage-collects
    every object the imports made (~100k after `import apache_beam`: 0.25-0.4 s, longer than a 200-image ingest's
    pixels); frozen, they are skipped. Only for a process about to end: a frozen object is never collected."""
    gc.freeze()
    sys.exit(int(code or 0))


def console() -> None:  # pragma: no cover - the `medpipe` console script
    exit_process(main())


if __name__ == "__main__":
    console()
