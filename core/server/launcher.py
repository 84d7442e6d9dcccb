"""The supervisor of `paged serve`: starts the engine core, then the API servers, and watches them all.

Order of life and death, as an orchestrator expects it:
- start-up: the core picks its backend and the API servers start, answering /health with 503 while the
  core loads the model; a model that cannot be served is a one-line reason and exit 2;
- the core dies: the API servers have already failed its open requests (they watch its pid); they are
  stopped and the supervisor exits 1, so the orchestrator restarts the whole server;
- an API server dies: logged, its requests aborted in the core, the others keep serving (exit 1 only
  when none is left);
- SIGTERM or SIGINT: the API servers get SIGTERM and drain (503 to new requests, running streams finish for
  up to --shutdown-timeout, then end with an error event), then the core is stopped; exit 0. No child
  outlives the supervisor (parent-death signal).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import tempfile
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import zmq

from paged.config import EngineConfig
from paged.core_protocol import ENCODER, InputKind
from paged.errors import UserError
from paged.server.api_process import APIServerOptions, run_api_server
from paged.server.core_process import run_engine_core
from paged.server.processes import CoreAddresses
from paged.server.settings import ServerSettings

logger = logging.getLogger(__name__)

# How long a child gets after SIGTERM beyond its own drain time before it is killed.
_STOP_GRACE_S = 5.0
# Where the API servers' histograms meet when there are several (Prometheus' multiprocess mode).
PROMETHEUS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as error:
            sock.close()
            raise UserError(f"cannot listen on {self.host}:{self.port}: {error.strerror}", param="port") from None
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock


class Supervisor:
    def __init__(self, config: EngineConfig, settings: ServerSettings, listen: Listen, api_server_count: int | None,
                 options: APIServerOptions) -> None:
        """api_server_count None: as many as the backend suggests (Backend.api_server_count)."""
        self.config = config
        self.settings = settings
        self.listen = listen
        self.options = options
        self.api_server_count = api_server_count
        self.addresses = CoreAddresses.local()
        self._spawn = multiprocessing.get_context("spawn")
        self._core: BaseProcess | None = None
        self._api_servers: dict[int, BaseProcess] = {}

    def run(self) -> int:
        """Serve until a signal (then exit by it), the core's death or the last API server's (1)."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        metrics_dir = None
        try:
            pipe = self._start_core()
            metrics_dir = self._metrics_dir()
            listener = self.listen.bind()
            self._start_api_servers(listener)
            listener.close()
            self._log_ready(self._receive(pipe))
            pipe.close()
            return self._watch()
        except _Stop as stop:
            logger.info("%s: draining the API servers, then stopping the engine core", stop)
            return 0
        finally:
            self._stop_all()
            self.addresses.remove()
            if metrics_dir is not None:
                metrics_dir.cleanup()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, _frame) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):  # the stop is under way: a second signal must not cut it
            signal.signal(s, signal.SIG_IGN)
        raise _Stop(signum)

    def _metrics_dir(self) -> tempfile.TemporaryDirectory | None:
        if self.api_server_count == 1 or PROMETHEUS_DIR_ENV in os.environ:
            return None
        folder = tempfile.TemporaryDirectory(prefix="paged-metrics-")
        os.environ[PROMETHEUS_DIR_ENV] = folder.name  # the spawned API servers inherit it
        return folder

    def _start_core(self) -> Connection:
        """Start the core and tell it how many API servers will connect once its backend is known; the pipe
        then brings the end of its model loading."""
        ours, theirs = self._spawn.Pipe()
        self._core = self._spawn.Process(
            target=run_engine_core, name="EngineCore",
            args=(self.config, self.addresses, theirs, os.getpid(), self.options.log_level))
        self._core.start()
        theirs.close()
        backend = self._receive(ours)
        self.api_server_count = self.api_server_count or backend["api_servers"]
        ours.send(self.api_server_count)
        return ours

    def _receive(self, conn: Connection) -> dict:
        """The core's next start-up report; its one-line error, or its early death, as a UserError."""
        wait([conn, self._core.sentinel])
        if not conn.poll():
            self._core.join()
            raise UserError(f"the engine core exited with code {self._core.exitcode} while starting")
        status, detail = conn.recv()
        if status == "error":
            self._core.join(_STOP_GRACE_S)  # it exits on its own; a SIGTERM now would cut its clean-up short
            raise UserError(detail)
        return detail

    def _start_api_servers(self, listener: socket.socket) -> None:
        for index in range(self.api_server_count):
            process = self._spawn.Process(
                target=run_api_server, name=f"APIServer{index}",
                args=(index, self.config, self.settings, self.addresses, self._core.pid, listener, self.options,
                      os.getpid()))
            process.start()
            logger.info("API server %d: pid %d", index, process.pid)
            self._api_servers[index] = process

    def _log_ready(self, facts: dict) -> None:
        tokens = facts["num_blocks"] * facts["block_size"]
        max_model_len = facts["max_model_len"]
        logger.info("maximum concurrency: %d sequences (--max-num-seqs); %.2fx requests of the full %d-token context "
                    "fit the KV cache at once", self.config.max_num_seqs, tokens / max_model_len, max_model_len)
        logger.info("serving %s on %s://%s:%d%s with %d API server(s) and the engine core (pid %d)%s",
                    ", ".join(self.settings.served_model_names), self.options.scheme, self.listen.host,
                    self.listen.port, self.options.root_path,
                    len(self._api_servers), self._core.pid, " (API key required)" if self.settings.api_key else "")

    def _watch(self) -> int:
        while True:
            sentinels = {self._core.sentinel: None} | {p.sentinel: i for i, p in self._api_servers.items()}
            for sentinel in wait(list(sentinels)):
                index = sentinels[sentinel]
                if index is None:
                    logger.error("the engine core (pid %d) died with exit code %s: stopping the server",
                                 self._core.pid, self._core.exitcode)
                    return 1
                process = self._api_servers.pop(index)
                process.join()
                logger.error("API server %d (pid %d) died with exit code %s; %d still serving", index, process.pid,
                             process.exitcode, len(self._api_servers))
                self._tell_core(InputKind.CLIENT_DEAD, index)
            if not self._api_servers:
                logger.error("no API server is left: stopping the server")
                return 1

    def _tell_core(self, kind: InputKind, payload: int) -> None:
        context = zmq.Context()
        try:
            push = context.socket(zmq.PUSH)
            push.connect(self.addresses.input)
            push.send_multipart([kind.value, ENCODER.encode(payload)])
        finally:
            context.destroy(linger=1000)

    def _stop_all(self) -> None:
        """API servers first (they drain their requests), the core last; whatever does not stop in time is killed."""
        _terminate(list(self._api_servers.values()), self.options.shutdown_timeout + _STOP_GRACE_S)
        self._api_servers.clear()
        if self._core is not None:
            _terminate([self._core], _STOP_GRACE_S)
            self._core = None


def _terminate(processes: list[BaseProcess], timeout: float) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout)
        if process.is_alive():
            logger.warning("%s (pid %d) did not stop in %.0f s: killed", process.name, process.pid, timeout)
            process.kill()
            process.join()
