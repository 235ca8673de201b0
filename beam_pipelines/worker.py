"""A Beam SDK worker for the local multi-processing runner that dies with the ingest process that started it.

    exec PYTHON -m beam_pipelines.worker PARENT_PID     (the command beam_pipelines.ingest gives the FnApiRunner)

Beam starts its multi-processing workers through `/bin/sh -c COMMAND` and nothing ends them when the runner process
is killed (SIGKILL, OOM killer): they would outlive it. Here the worker asks the kernel for SIGKILL when its parent
goes (PR_SET_PDEATHSIG); `exec` in the command makes the runner, not a shell, that parent. Then it is Beam's own
worker (`apache_beam.runners.worker.sdk_worker_main`), unchanged.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def bind_to_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent ends; exit at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect (or a shell sits in between)
        os._exit(1)


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
