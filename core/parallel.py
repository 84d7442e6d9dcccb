"""How a model is split over ranks: tensor parallel inside a pipeline stage, stages one after another.

Rank r holds stage r // tensor of the layers and slice r % tensor of each layer's heads and MLP, so the
ranks of one stage are consecutive (on one node under Ray's placement) and a stage's activations go to the
same slice of the next stage. Stage 0 also holds the embedding and the LM head (tied models share them
there): the last stage hands its final hidden states back to stage 0, which samples, so the engine core's
own rank 0 is where the tokens come from, as with one rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paged.backends.interface import Backend, Communicator
    from paged.config import EngineConfig


@dataclass(frozen=True)
class ParallelLayout:
    tensor: int = 1
    pipeline: int = 1
    rank: int = 0

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline

    @property
    def stage(self) -> int:
        return self.rank // self.tensor

    @property
    def tensor_rank(self) -> int:
        return self.rank % self.tensor

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pipeline - 1

    def tensor_groups(self) -> list[list[int]]:
        """The ranks of each stage's tensor-parallel group, stage by stage."""
        return [list(range(s * self.tensor, (s + 1) * self.tensor)) for s in range(self.pipeline)]

    def rank_at(self, stage: int) -> int:
        """The rank holding this rank's slice in `stage`."""
        return stage * self.tensor + self.tensor_rank

    def stage_layers(self, num_layers: int, stage: int | None = None) -> range:
        """The decoder layers of a stage (this rank's by default). Where they do not divide evenly the last
        stages take one more each: stage 0 already carries the embedding and the LM head."""
        stage = self.stage if stage is None else stage
        base, extra = divmod(num_layers, self.pipeline)
        start = stage * base + max(0, stage - (self.pipeline - extra))
        return range(start, start + base + (1 if stage >= self.pipeline - extra else 0))

    def most_layers(self, num_layers: int) -> int:
        """The layer count of the largest stage: it bounds how many KV blocks fit on every rank."""
        return max(len(self.stage_layers(num_layers, s)) for s in range(self.pipeline))

    def describe(self, num_layers: int) -> str:
        stages = ", ".join(f"stage {s}: layers {r.start}-{r.stop - 1} on ranks {g[0]}-{g[-1]}"
                           for s, g in enumerate(self.tensor_groups())
                           for r in [self.stage_layers(num_layers, s)])
        return f"tensor parallel {self.tensor} x pipeline parallel {self.pipeline} = {self.world_size} ranks ({stages})"


def layout_of(config: EngineConfig, rank: int = 0) -> ParallelLayout:
    return ParallelLayout(config.tensor_parallel_size, config.pipeline_parallel_size, rank)


def build_communicators(backend: Backend, layout: ParallelLayout) -> tuple[Communicator, Communicator | None]:
    """This rank's (tensor-parallel group's communicator, the whole world's for stage-to-stage transfers or
    None with one stage), once torch.distributed is initialised. Every rank creates every stage's group, in
    the same order, as torch.distributed requires."""
    import torch.distributed

    if layout.world_size == 1:
        return backend.communicator(), None
    world = backend.communicator(layout.rank, layout.world_size)
    if layout.pipeline == 1:
        return world, None
    groups = [torch.distributed.new_group(ranks) for ranks in layout.tensor_groups()]
    if layout.tensor == 1:
        return backend.communicator(), world
    return backend.communicator(layout.tensor_rank, layout.tensor, groups[layout.stage]), world
