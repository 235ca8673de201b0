"""Beam SDK workers for the local multi-processing runner that die with the ingest process that started them.

Two ways in, both ending in Beam's own worker (`apache_beam.runners.worker.sdk_worker_main`), unchanged:
- run_forked: a copy forked from the ingest process (beam_pipelines.local_runner, the default), which waits for the
  runner's endpoints on a pipe;
- `exec PYTHON -m beam_pipelines.worker PARENT_PID`: a fresh interpreter, the command the runner falls back to when
  it cannot fork safely.

Nothing ends Beam's workers when the runner process is killed (SIGKILL, OOM killer): they would outlive it. Here the
worker asks the kernel for SIGKILL when its parent goes (PR_SET_PDEATHSIG); `exec` in the command makes the runner,
not a shell, that parent.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import signal
import sys
import traceback

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def bind_to_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent ends; exit at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect (or a shell sits in between)
        os._exit(1)


def run_forked(pipe: int, parent_pid: int) -> None:
    """The body of a worker forked from the ingest process (beam_pipelines.local_runner): wait for the runner's
    endpoints on `pipe`, then run Beam's SDK harness with them. Never returns: the copy must not go on running the
    ingest process's own code."""
    code = 1
    try:
        bind_to_parent(parent_pid)
        with os.fdopen(pipe, "rb") as handle:
            message = handle.read()
        if not message:  # the runner did not need this copy
            code = 0
            return
        # The worker's log lines go to the runner over Beam's logging channel, like a fresh worker's; the handlers
        # copied from the ingest process would print them a second time. What it prints itself goes to file
        # descriptor 2, as a fresh worker's does (the ingest's quiet console points sys.stderr at the terminal).
        logging.getLogger().handlers.clear()
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        os.environ.update(json.loads(message))
        from apache_beam.runners.worker import sdk_worker_main

        gc.freeze()
        sdk_worker_main.main([])
        code = 0
    except BaseException:  # noqa: BLE001 - reported below, then the copy ends with a failure code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        bind_to_parent(int(argv[1]))
    from apache_beam.runners.worker import sdk_worker_main

    # Beam's imports are with us to the end: frozen, neither the collections while bundles run nor the teardown
    # collection at exit (0.25-0.4 s per worker) walk their ~100k objects again (medpipe.cli.exit_process).
    gc.freeze()
    sdk_worker_main.main(argv[:1])


if __name__ == "__main__":
    main(sys.argv)
