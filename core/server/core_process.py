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
from paged.engine_core import EngineCore
from paged.errors import UserError
from paged.model_source import resolve_model
from paged.request import RequestStatus
from paged.server.processes import CoreAddresses, become_child

logger = logging.getLogger(__name__)

# Clients that got no outputs in a while still get the stats (their gauges and periodic log), this often.
STATS_INTERVAL_S = 1.0


class CoreServer:
    """The core's sockets and loop: one PULL for every client's input, one PUSH per client for its outputs."""

    def __init__(self, core: EngineCore, addresses: CoreAddresses, num_clients: int) -> None:
        self.core = core
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PULL)
        self._input.bind(addresses.input)
        self._outputs: list[zmq.Socket | None] = []
        for address in map(addresses.output, range(num_clients)):
            socket = self._context.socket(zmq.PUSH)
            socket.setsockopt(zmq.SNDHWM, 0)  # a live client's outputs are never dropped; a dead one's socket is closed
            socket.setsockopt(zmq.LINGER, 0)
            socket.bind(address)
            self._outputs.append(socket)
        self._last_broadcast = 0.0

    def run(self) -> None:
        """Step until SIGTERM (a SystemExit) or a failure ends the process."""
        while True:
            busy = self.core.has_unfinished_requests()
            changed = self._take_messages(block=not busy)
            if self.core.has_unfinished_requests():
                outputs = self.core.step()
                self._send(outputs, broadcast=not self.core.has_unfinished_requests())  # idle now: final gauges
            elif changed:  # an abort while idle moved the gauges
                self._send([], broadcast=True)

    def fail(self, error: BaseException) -> None:
        """Tell every client why the core is going away."""
        message = f"the engine core failed: {type(error).__name__}: {error}"
        for socket in self._outputs:
            if socket is not None:
                socket.send_multipart([OutputKind.FAILED.value, ENCODER.encode(message)], flags=zmq.NOBLOCK)

    def close(self) -> None:
        self._context.destroy(linger=1000)

    def _take_messages(self, block: bool) -> bool:
        """Apply every message waiting (waiting for one when idle); True if any came."""
        if block and not self._input.poll(timeout=None):
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
        socket = self._outputs[index] if index < len(self._outputs) else None
        if socket is not None:
            message = ENCODER.encode(CoreOutputs(outputs, self.core.stats))
            socket.send_multipart([OutputKind.OUTPUTS.value, message], copy=False)


def run_engine_core(config: EngineConfig, addresses: CoreAddresses, ready: Connection, parent_pid: int,
                    log_level: str) -> None:
    """The process's entry point: load the model, report ready (or the one-line reason it cannot) with the
    number of API servers the backend suggests, bind a socket for each API server the supervisor then
    starts, serve."""
    become_child("EngineCore", log_level, parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        core = EngineCore(config, resolve_model(config.model, config.tokenizer))
        ready.send(("loaded", {"num_blocks": core.num_blocks, "max_model_len": core.max_model_len,
                               "api_servers": core.backend.api_server_count(os.cpu_count() or 1)}))
        server = CoreServer(core, addresses, ready.recv())
    except UserError as error:
        ready.send(("error", str(error)))
        sys.exit(1)
    except Exception as error:
        logger.exception("the engine core could not start")
        ready.send(("error", f"the engine core could not start: {type(error).__name__}: {error}"))
        sys.exit(1)
    ready.send(("ready", None))
    ready.close()
    try:
        server.run()
    except Exception as error:
        logger.exception("the engine core failed; every open request fails with it")
        server.fail(error)
        sys.exit(1)
    finally:  # SIGTERM (SystemExit) ends here too
        server.close()


def _exit_on_signal(signum: int, _frame) -> None:
    raise SystemExit(0)
