"""Workers as Ray actors, one per device, over the nodes of a Ray cluster: the `ray` transport of
ParallelExecutor, for a model that needs more devices than one machine has.

The cluster is the one RAY_ADDRESS names (`ray start --head` on the head node, `ray start --address` on the
others, this engine on the head), or a local one Ray starts when none is named. Each pipeline stage's ranks get
a placement group packed onto one node, so tensor-parallel all-reduces never cross nodes; stage 0's group is
pinned to this node, and its first bundle is held for rank 0 (this process) so Ray gives no worker that
device. A step's message is put in Ray's object store once and every actor reads it from there.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any

from paged.errors import UserError
from paged.parallel import ParallelLayout
from paged.worker import Worker, WorkerSpec

_CONNECT_TIMEOUT_S = 5.0
_PLACEMENT_TIMEOUT_S = 60.0
_START_TIMEOUT_S = 300.0


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("--distributed-executor-backend ray needs Ray: pip install ray",
                        param="distributed_executor_backend") from None
    return ray


def _check_answers(address: str | None) -> None:
    """A head node named host:port that takes no connection is one line now, where Ray itself would retry for
    minutes."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as error:
        raise UserError(f"the Ray cluster at RAY_ADDRESS={address} does not answer ({error}); start it with "
                        "`ray start --head` or name its head node", param="distributed_executor_backend") from None


class _RankActor:
    """A Ray actor holding one rank's Worker."""

    def __init__(self, rank: int, spec: WorkerSpec) -> None:
        self.worker = Worker(rank, spec, 0, 1)  # Ray shows each actor only the device it was given

    def ready(self) -> int:
        return os.getpid()

    def handle(self, message: tuple[str, Any]) -> None:
        """A rank whose step fails (a peer died under a collective) ends, as a worker process would: its
        connections close, so the ranks waiting on it fail now instead of at the collective timeout."""
        try:
            self.worker.handle(*message)
        except BaseException:
            traceback.print_exc()
            os._exit(1)


class _DeviceLease:
    """Holds rank 0's bundle, so no worker is given the device the engine core uses."""

    def accelerator_ids(self) -> dict[str, list[str]]:
        import ray

        return ray.get_runtime_context().get_accelerator_ids()


class RayRanks:
    def __init__(self, layout: ParallelLayout, resource: str) -> None:
        ray = self.ray = _ray()
        self.layout, self.resource = layout, resource
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            address = os.environ.get("RAY_ADDRESS")
            _check_answers(address)
            try:
                ray.init(address=address, log_to_driver=True, logging_level="warning")
            except Exception as error:  # Ray raises ConnectionError, RuntimeError, ... for a cluster not there
                where = f"at {address}" if address else "(a local one)"
                raise UserError(f"the Ray cluster {where} does not answer: {str(error).splitlines()[0]}",
                                param="distributed_executor_backend") from None
        self.host = ray.util.get_node_ip_address()
        self.groups: list = []
        self.actors: list = []
        self.lease = None
        self.pids: list[int] = []
        self.pending: list = []

    def _bundle(self, pinned: bool) -> dict[str, float]:
        bundle = {self.resource: 1.0}
        if pinned:
            bundle[f"node:{self.host}"] = 0.001
        return bundle

    def _options(self, group, index: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
        amounts = {"CPU": {"num_cpus": 1}, "GPU": {"num_cpus": 0, "num_gpus": 1}}
        return dict(scheduling_strategy=strategy, **amounts.get(self.resource,
                                                                {"num_cpus": 0, "resources": {self.resource: 1}}))

    def start(self, spec: WorkerSpec) -> None:
        ray, layout = self.ray, self.layout
        from ray.util.placement_group import placement_group

        have = ray.cluster_resources().get(self.resource, 0)
        if have < layout.world_size:
            self.stop()
            raise UserError(f"{layout.world_size} ranks need {layout.world_size} {self.resource}; the Ray cluster has "
                            f"{have:g}", param="distributed_executor_backend")
        for stage in range(layout.pipeline):
            self.groups.append(placement_group([self._bundle(stage == 0) for _ in range(layout.tensor)],
                                               strategy="STRICT_PACK", name=f"paged-stage{stage}"))
        for stage, group in enumerate(self.groups):
            try:
                ray.get(group.ready(), timeout=_PLACEMENT_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                self.stop()
                raise UserError(f"the Ray cluster cannot place pipeline stage {stage}: it needs {layout.tensor} "
                                f"{self.resource} on one node{' (this one)' if stage == 0 else ''}; the cluster has "
                                f"{ray.cluster_resources().get(self.resource, 0):g} {self.resource} in all",
                                param="distributed_executor_backend") from None
        self.lease = ray.remote(_DeviceLease).options(**self._options(self.groups[0], 0)).remote()
        actor = ray.remote(_RankActor)
        for rank in range(1, layout.world_size):
            stage, index = divmod(rank, layout.tensor)
            self.actors.append(actor.options(name=f"paged-rank{rank}", **self._options(self.groups[stage], index))
                               .remote(rank, spec))

    def place_core(self, backend) -> None:
        """Rank 0 takes the device of its bundle, where Ray counts devices of this kind (not CPUs)."""
        ids = self.ray.get(self.lease.accelerator_ids.remote()).get(self.resource)
        if ids:
            backend.set_device(int(ids[0]))

    def wait_ready(self) -> None:
        ray = self.ray
        try:
            self.pids = ray.get([a.ready.remote() for a in self.actors], timeout=_START_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as error:
            raise UserError(f"a Ray worker did not start: {str(error).splitlines()[0]}") from None

    def send(self, kind: str, payload: Any) -> None:
        message = self.ray.put((kind, payload))  # once: every actor reads it from the object store
        self.pending = [a.handle.remote(message) for a in self.actors]

    def dead(self) -> list[str]:
        ray, dead = self.ray, []
        for rank, ref in enumerate(self.pending, start=1):
            done, _ = ray.wait([ref], timeout=2)
            if done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    dead.append(f"{rank} (Ray actor pid {self.pids[rank - 1] if self.pids else '?'})")
                except ray.exceptions.RayTaskError:
                    pass
        return dead

    def describe(self) -> str:
        return f"Ray actors pids {self.pids} over placement groups of {self.layout.tensor} {self.resource} per stage"

    def stop(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            return
        from ray.util.placement_group import remove_placement_group

        for actor in [*self.actors, *([self.lease] if self.lease else [])]:
            ray.kill(actor)
        for group in self.groups:
            remove_placement_group(group)
        self.actors, self.groups, self.lease = [], [], None
        if self.started_ray:
            ray.shutdown()
