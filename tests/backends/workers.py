"""Code the conformance suite runs in spawned processes (importable by name, as spawn requires)."""

from __future__ import annotations

import torch

from paged.backends.registry import discover


def collectives(rank: int, world_size: int, port: int, backend_name: str) -> None:
    """One rank: the backend's communicator over torch.distributed, every collective checked against its sum."""
    backend = {r.name: r.backend for r in discover()}[backend_name]()
    torch.distributed.init_process_group(backend.dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        index = rank % backend.device_count()
        backend.set_device(index)
        device = backend.device(index)
        comm = backend.communicator(rank, world_size)
        total = comm.all_reduce(torch.full((2, 3), float(rank + 1), device=device))
        assert torch.equal(total.cpu(), torch.full((2, 3), world_size * (world_size + 1) / 2)), total
        gathered = comm.all_gather(torch.full((2, 1), float(rank), device=device), dim=-1)
        assert torch.equal(gathered.cpu(), torch.arange(world_size, dtype=torch.float32).expand(2, -1)), gathered
        sent = comm.broadcast(torch.full((3,), float(rank), device=device), src=world_size - 1)
        assert torch.equal(sent.cpu(), torch.full((3,), float(world_size - 1))), sent
        comm.barrier()
    finally:
        torch.distributed.destroy_process_group()
