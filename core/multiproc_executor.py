"""Workers as processes of this machine, one per device: the `mp` transport of ParallelExecutor. Each step's
message is published once on a ZeroMQ socket every worker subscribes to (ZeroMQ's I/O thread copies it to
each, off the engine core's thread); a pipe per worker only says when it is ready. A worker dies with the
process that started it, even a SIGKILLed one."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import sys
import tempfile
import uuid
from typing import Any

import zmq

from paged.errors import UserError
from paged.worker import Worker, WorkerSpec

_START_TIMEOUT_S = 300.0
_SUBSCRIBE_TIMEOUT_MS = 30_000


def worker_main(rank: int, spec: WorkerSpec, conn: multiprocessing.connection.Connection, steps: str,
                parent_pid: int, log_level: str) -> None:
    from paged.server.processes import become_child

    become_child(f"Worker{rank}", log_level, parent_pid)
    worker = Worker(rank, spec, rank, spec.config.tensor_parallel_size * spec.config.pipeline_parallel_size)
    context = zmq.Context()
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt(zmq.RCVHWM, 0)
    subscriber.connect(steps)
    subscriber.subscribe(b"")
    try:
        conn.send("ready")
        while True:
            kind, payload = pickle.loads(subscriber.recv())
            if kind == "stop":
                return
            worker.handle(kind, payload)
    finally:
        subscriber.close(linger=0)
        context.term()
        worker.close()


class ProcessRanks:
    host = "127.0.0.1"

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.conns: list[multiprocessing.connection.Connection] = []
        self.processes: list[multiprocessing.Process] = []
        self.context = zmq.Context()
        # XPUB rather than PUB: it hands over each worker's subscription, so the first step is sent only once
        # every worker will receive it; never drop a message for a worker that lags.
        self.publisher = self.context.socket(zmq.XPUB)
        self.publisher.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.publisher.setsockopt(zmq.SNDHWM, 0)
        name = f"paged-steps-{uuid.uuid4().hex[:12]}"
        # Linux's abstract namespace ("@") leaves no socket file behind, however the process ends.
        self.socket_file = None if sys.platform.startswith("linux") else os.path.join(tempfile.gettempdir(), name)
        self.address = f"ipc://{self.socket_file or '@' + name}"
        self.publisher.bind(self.address)

    def start(self, spec: WorkerSpec) -> None:
        context = multiprocessing.get_context("spawn")
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        for rank in range(1, self.world_size):
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, name=f"paged-worker{rank}", daemon=True,
                                      args=(rank, spec, child, self.address, os.getpid(), level))
            process.start()
            child.close()
            self.conns.append(parent)
            self.processes.append(process)

    def place_core(self, backend) -> None:
        backend.place_rank(0, self.world_size)  # rank r takes device r

    def wait_ready(self) -> None:
        for rank, conn in enumerate(self.conns, start=1):
            if not conn.poll(_START_TIMEOUT_S) or conn.recv() != "ready":
                raise UserError(f"model-parallel worker {rank} did not start (exit code "
                                f"{self.processes[rank - 1].exitcode})")
        for _ in self.processes:
            if not self.publisher.poll(_SUBSCRIBE_TIMEOUT_MS):
                raise UserError("a model-parallel worker did not subscribe to the engine core's steps")
            self.publisher.recv()

    def send(self, kind: str, payload: Any) -> None:
        self.publisher.send(pickle.dumps((kind, payload)))  # serialised once, copied to each worker by ZeroMQ

    def dead(self) -> list[str]:
        for process in self.processes:
            process.join(timeout=2)
        return [f"{rank} (exit code {p.exitcode})" for rank, p in enumerate(self.processes, start=1)
                if p.exitcode is not None]

    def describe(self) -> str:
        return f"worker pids {[process.pid for process in self.processes]}"

    def stop(self) -> None:
        if self.publisher.closed:
            return
        self.send("stop", None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        # destroy, not term: term waits for every socket of the context to be closed, and with a worker killed
        # mid-step it hung a test run for 15 minutes; destroy closes them all, dropping what is unsent.
        self.context.destroy(linger=0)
        if self.socket_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_file)
