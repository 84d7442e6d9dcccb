"""The engine core process of `paged serve`: it steps the EngineCore as fast as the device allows.

It never waits on HTTP: between steps it takes whatever messages arrived (new requests, aborts, stop
strings the API servers found) without blocking, and after each step it sends every API server the
outputs of its own requests, one message per step, with the core's stats. It blocks only when it has
nothing to run. If a step raises, every API server is told why before the process exits non-zero, so
no request waits forever.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from multiprocessing.connection import Connection

import zmq

from paged.config import EngineConfig
from paged.core_protocol import (
    ENCODER,
    IDS_DECODER,
    INDEX_DECODER,
    REQUEST_DECODER,
    CoreOutput,
    CoreOutputs,
    InputKind,
    OutputKind,
)
from paged.backends.registry import load_backend
from paged.engine_core import EngineCore
from paged.errors import UserError
from paged.model_source import source_of
from paged.request import RequestStatus
from paged.server.processes import CoreAddresses, become_child

logger = logging.getLogger(__name__)

# Every client hears from the core at least this often, with the stats: busy or idle, that is its heartbeat
# (the gauges, the periodic log and /health read it).
STATS_INTERVAL_S = 1.0


class CoreServer:
    """The core's sockets and loop: one PULL for every client's input, one PUSH per client for its outputs.

    The sockets are bound before the model loads, so API servers can start (and answer /health with 503
    "loading") meanwhile; each says HELLO until the core, loaded, answers READY with its facts. Sends never
    block: a client that is not connected (still starting, or gone) misses stats it does not need, and a
    connected one has no send limit, so its outputs are never dropped.
    """

    def __init__(self, addresses: CoreAddresses, num_clients: int) -> None:
        self.core: EngineCore | None = None
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PULL)
        self._input.bind(addresses.input)
        self._outputs: list[zmq.Socket | None] = []
        for address in map(addresses.output, range(num_clients)):
            socket = self._context.socket(zmq.PUSH)
            socket.setsockopt(zmq.SNDHWM, 0)
            socket.setsockopt(zmq.LINGER, 0)
            socket.bind(address)
            self._outputs.append(socket)
        self._last_broadcast = 0.0

    def serve(self, core: EngineCore) -> None:
        """Step until SIGTERM (a SystemExit) or a failure ends the process."""
        self.core = core
        while True:
            busy = core.has_unfinished_requests()
            changed = self._take_messages(block=not busy)
            if core.has_unfinished_requests():
                outputs = core.step()
                self._send(outputs, broadcast=not core.has_unfinished_requests())  # idle now: final gauges
            else:  # idle: an abort moved the gauges, or it is time for the heartbeat
                self._send([], broadcast=changed)

    def facts(self) -> dict:
        """What clients report of the core: its KV cache, for the metrics and the log."""
        core = self.core
        return {"num_blocks": core.num_blocks, "block_size": core.config.block_size, "max_model_len": core.max_model_len,
                "kv_cache_bytes": core.kv_cache_bytes, "kv_cache_dtype": str(core.kv_dtype).removeprefix("torch."),
                "enable_prefix_caching": core.config.enable_prefix_caching}

    def fail(self, error: BaseException) -> None:
        """Tell every client why the core is going away."""
        self._broadcast(OutputKind.FAILED, f"the engine core failed: {type(error).__name__}: {error}")

    def close(self, linger_ms: int = 0) -> None:
        """Close every socket; `linger_ms` lets a last message (why the core failed) reach the clients."""
        self._context.destroy(linger=linger_ms)

    def _take_messages(self, block: bool) -> bool:
        """Apply every message waiting (waiting up to a heartbeat for one when idle); True if any came."""
        if block and not self._input.poll(timeout=STATS_INTERVAL_S * 1000):
            return False
        took = False
        while True:
            try:
                kind, payload = self._input.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return took
            took = True
            self._apply(InputKind(kind.bytes), payload.buffer)

    def _apply(self, kind: InputKind, payload: memoryview) -> None:
        if kind is InputKind.ADD:
            request = REQUEST_DECODER.decode(payload)
            try:
                self.core.add_request(request)
            except UserError as error:  # the API server checked everything it could; an id clash is left
                self._send_to(request.client_index, [CoreOutput(request.request_id, request.request_id, 0,
                                                                error=str(error))])
        elif kind is InputKind.ABORT:
            self.core.abort_requests(IDS_DECODER.decode(payload))
        elif kind is InputKind.STOP:
            self.core.abort_requests(IDS_DECODER.decode(payload), RequestStatus.FINISHED_STOPPED)
        elif kind is InputKind.HELLO:
            self._send_kind(INDEX_DECODER.decode(payload), OutputKind.READY, self.facts())
        elif kind is InputKind.CLIENT_DEAD:
            self._drop_client(INDEX_DECODER.decode(payload))

    def _drop_client(self, index: int) -> None:
        orphans = [group for group, sequences in self.core.groups.items() if sequences[0].client_index == index]
        self.core.abort_requests(orphans)
        socket, self._outputs[index] = self._outputs[index], None
        if socket is not None:
            socket.close(linger=0)
        logger.warning("API server %d is gone: aborted its %d requests", index, len(orphans))

    def _send(self, outputs: list[CoreOutput], broadcast: bool = False) -> None:
        """Each client's outputs of this step; every client, with the stats, at least every STATS_INTERVAL_S."""
        now = time.monotonic()
        if now - self._last_broadcast >= STATS_INTERVAL_S:
            broadcast = True
        if broadcast:
            self._last_broadcast = now
        per_client: dict[int, list[CoreOutput]] = {i: [] for i in range(len(self._outputs))} if broadcast else {}
        for out in outputs:
            per_client.setdefault(out.client_index, []).append(out)
        for index, mine in per_client.items():
            self._send_to(index, mine)

    def _send_to(self, index: int, outputs: list[CoreOutput]) -> None:
        self._send_kind(index, OutputKind.OUTPUTS, CoreOutputs(outputs, self.core.stats))

    def _broadcast(self, kind: OutputKind, payload) -> None:
        for index in range(len(self._outputs)):
            self._send_kind(index, kind, payload)

    def _send_kind(self, index: int, kind: OutputKind, payload) -> None:
        socket = self._outputs[index] if index < len(self._outputs) else None
        if socket is None:
            return
        try:
            socket.send_multipart([kind.value, ENCODER.encode(payload)], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # not connected (yet, or any more): nothing it needs is lost
            pass


def run_engine_core(config: EngineConfig, addresses: CoreAddresses, supervisor: Connection, parent_pid: int,
                    log_level: str) -> None:
    """The process's entry point. Tells the supervisor, in turn: the API server count its backend suggests
    (then binds a socket for each API server the supervisor starts), that the model is loaded (or the
    one-line reason it cannot be); then serves."""
    become_child("EngineCore", log_level, parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    server = None
    try:
        source = source_of(config)
        backend = load_backend(config.device)
        supervisor.send(("backend", {"api_servers": backend.api_server_count(os.cpu_count() or 1)}))
        server = CoreServer(addresses, supervisor.recv())
        core = EngineCore(config, source, backend)
    except Exception as error:
        if not isinstance(error, UserError):
            logger.exception("the engine core could not start")
            error = f"the engine core could not start: {type(error).__name__}: {error}"
        supervisor.send(("error", str(error)))
        sys.exit(1)
    try:
        server.core = core
        supervisor.send(("ready", server.facts()))
        supervisor.close()
        server.serve(core)
    except Exception as error:
        logger.exception("the engine core failed; every open request fails with it")
        server.fail(error)
        server.close(linger_ms=2000)
        sys.exit(1)
    finally:  # SIGTERM (SystemExit) ends here too
        server.close()


def _exit_on_signal(signum: int, _frame) -> None:
    raise SystemExit(0)
