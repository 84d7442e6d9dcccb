"""Collectives as XLA ops over one axis of a JAX device mesh.

JAX drives every chip of a host from one process (SPMD): a tensor-parallel "rank" is a position along
a mesh axis inside `jax.shard_map`, not a process, and a collective is an XLA op (psum, all_gather)
that the compiler schedules over the interconnect (ICI on TPU). These methods therefore take effect in
code traced under shard_map over `mesh` with `axis` among its manual axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch

from paged.backends.interface import Communicator


class XLACommunicator(Communicator):
    def __init__(self, mesh: jax.sharding.Mesh, axis: str = "tp") -> None:
        super().__init__(rank=0, world_size=mesh.shape[axis])
        self.mesh = mesh
        self.axis = axis

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._apply(lambda x: jax.lax.psum(x, self.axis), tensor)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return self._apply(lambda x: jax.lax.all_gather(x, self.axis, axis=dim % x.ndim, tiled=True), tensor)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        def from_src(x: jax.Array) -> jax.Array:
            mine = jax.lax.axis_index(self.axis) == src
            return jax.lax.psum(jnp.where(mine, x, jnp.zeros_like(x)), self.axis)

        return self._apply(from_src, tensor)

    def barrier(self) -> None:
        """Nothing to wait for: XLA orders collectives within the one program every chip runs."""
        return None

    @staticmethod
    def _apply(op, tensor: torch.Tensor) -> torch.Tensor:
        from torchax.interop import jax_view, torch_view

        return torch_view(op(jax_view(tensor)))


def device_mesh(world_size: int, axis: str = "tp") -> jax.sharding.Mesh:
    """A one-axis mesh over the first world_size devices of JAX's default platform."""
    devices = jax.devices()
    if world_size > len(devices):
        raise ValueError(f"tensor parallel size {world_size} exceeds the {len(devices)} JAX devices here")
    return jax.sharding.Mesh(devices[:world_size], (axis,))
