"""The local multi-processing FnApiRunner with forked SDK workers.

Beam's multi-processing mode starts every SDK worker as a fresh interpreter (`/bin/sh -c python -m ...`) that
imports Beam, Pillow and numpy again before its first bundle: ~0.9 s per worker on this machine, 1 s of every local
ingest's wall time. Here the runner forks the workers from the ingest process itself, which has imported all of
that already (copy-on-write: a fork costs milliseconds). Each copy waits on a pipe for the endpoints the runner
hands a worker (the same environment variables Beam's subprocess worker gets), then is Beam's own SDK harness
(`apache_beam.runners.worker.sdk_worker_main`), unchanged: the same bundles, the same gRPC control, data, state and
logging channels, so the output is the same, byte for byte.

A fork is safe only from a process with one Python thread and no gRPC object yet: the copies are made in
run_pipeline, before the runner starts its gRPC servers (the native pools already running, OpenBLAS's and pyarrow's
jemalloc thread, have their own fork handlers, as with multiprocessing's default fork start). When that does not
hold (another thread is running, not Linux), the workers are Beam's fresh interpreters (beam_pipelines.worker), as
before. The copies die with the ingest process
(PR_SET_PDEATHSIG, beam_pipelines.worker.bind_to_parent); an unused copy exits when its pipe closes.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import threading
from dataclasses import dataclass

import grpc
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.portability.api import beam_fn_api_pb2_grpc, endpoints_pb2
from apache_beam.runners.portability import local_job_service
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.portability.fn_api_runner import worker_handlers
from apache_beam.transforms.environments import Environment, SubprocessSDKEnvironment
from apache_beam.utils import thread_pool_executor
from google.protobuf import json_format, text_format

LOG = logging.getLogger("medpipe.ingest")

FORKED_SDK_URN = "medpipe:env:forked_sdk_worker:v1"


@dataclass
class Standby:
    """A forked copy of this process, waiting for a worker's endpoints on the write end of its pipe."""

    pid: int
    pipe: int  # write end; closed once the endpoints are sent (or unused at exit)


_STANDBYS: list[Standby] = []
_STANDBYS_LOCK = threading.Lock()


def fork_standbys(count: int) -> int:
    """Fork `count` standby workers now, if this process can be forked safely; returns how many exist."""
    if not sys.platform.startswith("linux") or threading.active_count() != 1:
        return 0
    from apache_beam.runners.worker import sdk_worker_main  # noqa: F401 - imported once, here, for every copy

    from beam_pipelines import records  # noqa: F401 - the DoFns' modules: Pillow, numpy, pydicom's loader
    from beam_pipelines import worker

    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    while len(_STANDBYS) < count:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the copy: never returns into the caller's code
            os.close(write_end)
            for other in _STANDBYS:
                os.close(other.pipe)
            worker.run_forked(read_end, parent)
        os.close(read_end)
        _STANDBYS.append(Standby(pid, write_end))
    return len(_STANDBYS)


def take_standby() -> Standby | None:
    with _STANDBYS_LOCK:
        return _STANDBYS.pop(0) if _STANDBYS else None


def release_standbys() -> None:
    """Unused copies exit when their pipe closes (end of file, no endpoints); reap them."""
    while (standby := take_standby()) is not None:
        os.close(standby.pipe)
        os.waitpid(standby.pid, 0)


class ForkedSdkWorker(local_job_service.SubprocessSdkWorker):
    """Beam's SubprocessSdkWorker.run with the endpoints sent to a standby instead of a new interpreter."""

    def __init__(self, standby: Standby, control_address, provision_info, worker_id=None):
        super().__init__(b"", control_address, provision_info, worker_id)
        self._standby = standby

    def run(self):
        logging_server = grpc.server(thread_pool_executor.shared_unbounded_instance(),
                                     options=[("grpc.http2.max_pings_without_data", 0),
                                              ("grpc.http2.max_ping_strikes", 0)])
        logging_port = logging_server.add_insecure_port("localhost:0")
        logging_server.start()
        beam_fn_api_pb2_grpc.add_BeamFnLoggingServicer_to_server(local_job_service.BeamFnLoggingServicer(),
                                                         logging_server)
        environment = {
            "CONTROL_API_SERVICE_DESCRIPTOR": text_format.MessageToString(
                endpoints_pb2.ApiServiceDescriptor(url=self._control_address)),
            "LOGGING_API_SERVICE_DESCRIPTOR": text_format.MessageToString(
                endpoints_pb2.ApiServiceDescriptor(url=f"localhost:{logging_port}")),
            "PIPELINE_OPTIONS": json_format.MessageToJson(self._provision_info.provision_info.pipeline_options),
        }
        if self._worker_id:
            environment["WORKER_ID"] = self._worker_id
        try:
            with os.fdopen(self._standby.pipe, "wb") as pipe:
                pipe.write(json.dumps(environment).encode("utf-8"))
            _, status = os.waitpid(self._standby.pid, 0)
            code = os.waitstatus_to_exitcode(status)
            if code:
                raise RuntimeError(f"Worker subprocess exited with return code {code}")
        finally:
            logging_server.stop(0)


@Environment.register_urn(FORKED_SDK_URN, bytes)
class ForkedSDKEnvironment(SubprocessSDKEnvironment):
    """Forked workers; the payload is the command for a fresh worker when no standby is left."""

    def to_runner_api_parameter(self, context):
        return FORKED_SDK_URN, self.command_string.encode("utf-8")

    @staticmethod
    def from_runner_api_parameter(payload, capabilities, artifacts, resource_hints, context):
        return ForkedSDKEnvironment(payload.decode("utf-8"), capabilities, artifacts, resource_hints)


@worker_handlers.WorkerHandler.register_environment(FORKED_SDK_URN, bytes)
class ForkedSdkWorkerHandler(worker_handlers.SubprocessSdkWorkerHandler):
    def start_worker(self):
        standby = take_standby()
        if standby is None:  # no safe fork was possible: a fresh interpreter, Beam's way
            super().start_worker()
            return
        self.worker = ForkedSdkWorker(standby, self.control_address, self.provision_info, self.worker_id)
        self.worker_thread = threading.Thread(name="run_worker", target=self.worker.run)
        self.worker_thread.start()


def make_runner(options: PipelineOptions):
    """A runner instance for the local multi-processing FnApiRunner (forked workers, bound to this process); None
    for any other runner (Beam builds it from --runner)."""
    if options.view_as(StandardOptions).runner != "FnApiRunner":
        return None
    if options.view_as(DirectOptions).direct_running_mode != "multi_processing":
        return None
    command = f"exec {shlex.quote(sys.executable)} -m beam_pipelines.worker {os.getpid()}"

    class Runner(FnApiRunner):
        # FnApiRunner.run_pipeline sets _default_environment to its own worker command for multi_processing, after
        # the pipeline is built and before its gRPC servers start: the moment to fork (one thread, no gRPC yet).
        @property
        def _default_environment(self):
            return self._medpipe_environment

        @_default_environment.setter
        def _default_environment(self, environment):
            if isinstance(environment, SubprocessSDKEnvironment):
                forked = fork_standbys(self._num_workers)
                LOG.debug("ingest: %d of %d SDK workers forked (the rest: fresh interpreters)", forked,
                          self._num_workers)
                environment = ForkedSDKEnvironment.from_command_string(command)
            self._medpipe_environment = environment

        def run_pipeline(self, pipeline, options):
            try:
                return super().run_pipeline(pipeline, options)
            finally:
                release_standbys()

    return Runner()
