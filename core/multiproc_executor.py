"""Workers as processes of this machine, one per device, each fed through a pipe: the `mp` transport of
ParallelExecutor. A worker dies with the process that started it, even a SIGKILLed one."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
from typing import Any

from paged.errors import UserError
from paged.worker import Worker, WorkerSpec

_START_TIMEOUT_S = 300.0


def worker_main(rank: int, spec: WorkerSpec, conn: multiprocessing.connection.Connection, parent_pid: int,
                log_level: str) -> None:
    from paged.server.processes import become_child

    become_child(f"Worker{rank}", log_level, parent_pid)
    worker = Worker(rank, spec, rank, spec.config.tensor_parallel_size * spec.config.pipeline_parallel_size)
    try:
        conn.send("ready")
        while True:
            try:
                kind, payload = pickle.loads(conn.recv_bytes())
            except EOFError:  # the engine core is gone
                return
            if kind == "stop":
                return
            worker.handle(kind, payload)
    finally:
        worker.close()


class ProcessRanks:
    host = "127.0.0.1"

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.conns: list[multiprocessing.connection.Connection] = []
        self.processes: list[multiprocessing.Process] = []

    def start(self, spec: WorkerSpec) -> None:
        context = multiprocessing.get_context("spawn")
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        for rank in range(1, self.world_size):
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, name=f"paged-worker{rank}", daemon=True,
                                      args=(rank, spec, child, os.getpid(), level))
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

    def send(self, kind: str, payload: Any) -> None:
        data = pickle.dumps((kind, payload))  # once for every worker
        for conn in self.conns:
            conn.send_bytes(data)

    def dead(self) -> list[str]:
        for process in self.processes:
            process.join(timeout=2)
        return [f"{rank} (exit code {p.exitcode})" for rank, p in enumerate(self.processes, start=1)
                if p.exitcode is not None]

    def describe(self) -> str:
        return f"worker pids {[process.pid for process in self.processes]}"

    def stop(self) -> None:
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(("stop", None)))
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
