"""The seam between the hardware-agnostic core and one vendor's hardware.

Core and models talk to a device only through `Backend`. A vendor ships a subclass (in tree under
backends/<vendor>/ or out of tree as a plugin) and never needs to patch the core: if the core needs
something vendor-specific, it becomes a member here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch


@dataclass(frozen=True)
class Availability:
    """Result of a backend's probe: whether it can run here, and a reason either way."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class Precision:
    """The dtypes a model runs in. Activations, norms and (by default) the KV cache compute in `compute`;
    linear weights are stored in `weights`, which a backend may make narrower than `compute` where that
    is faster (a CPU without bfloat16 arithmetic multiplies in float32 over bfloat16 weights, reading
    half the bytes). `why` says how it was chosen, for the start-up log."""

    compute: torch.dtype
    weights: torch.dtype
    why: str = ""
    kept: str | None = None  # the checkpoint's own quantized format, where matrices are computed from it

    def __str__(self) -> str:
        name = str(self.compute).removeprefix("torch.")
        if self.kept:
            return f"{name} from {self.kept}"
        if self.weights == self.compute:
            return name
        return f"{name} over {str(self.weights).removeprefix('torch.')} weights"


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what they attend to; built once per step by the model runner.

    The batch is ragged: sequence b contributes query tokens query_start_loc[b]:query_start_loc[b+1]
    (a prefill chunk or a single decode token), which sit at the last positions of its context of
    seq_lens[b] tokens. Query token i of sequence b attends causally to context positions
    0 .. seq_lens[b] - query_len[b] + i. Keys and values of the whole context live in the paged cache,
    reached through block_tables; the new tokens' keys and values are written first, at slot_mapping
    (slot = block_id * block_size + offset; -1 means a padding token that writes nothing).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Whatever the backend's attention precomputes once per step (see Attention.prepare).
    prepared: Any = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class Attention(ABC):
    """Paged attention: write the new K/V into the cache, then attend over cached context + new tokens."""

    def prepare(self, meta: AttentionMetadata) -> Any:
        """Precompute per-step index tensors shared by every layer; the result lands in meta.prepared.

        Kernels that read meta's index tensors directly need nothing here.
        """
        return None

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # the backend's kv_cache_shape
        meta: AttentionMetadata,
        scale: float,
        kv_scale: torch.Tensor | None = None,  # [2] float32 (K, V) for a cache in a narrower type (fp8)
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write key/value at meta.slot_mapping, then return the attention output for every query token.

        `window`: a sliding-window layer's (Mistral's, Gemma's local layers): the query at position p sees
        only keys at p - window < j <= p, so a kernel need not read older blocks (the block manager may even
        have handed them on, where every layer slides). `softcap`: Gemma 2's logit soft-capping, every scaled
        score s becoming softcap * tanh(s / softcap) before the mask and the softmax.

        A cache whose dtype is fp8 stores key / kv_scale[0] and value / kv_scale[1] (saturated to the type's
        range) and multiplies them back when reading; the scales are the layer's own (the checkpoint's, else 1)."""


class LinearKernel(ABC):
    """A backend's product with weights in one quantized form (paged.quant.matrix): `prepare` packs a matrix
    into the kernel's own layout once, after loading; `apply` computes x W^T (+ bias) from it."""

    name: ClassVar[str]  # for the start-up log, e.g. "Triton int4 GEMV/GEMM"

    @abstractmethod
    def prepare(self, matrix: Any) -> Any: ...

    @abstractmethod
    def apply(self, state: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    @abstractmethod
    def nbytes(self, state: Any) -> int:
        """Device bytes the prepared weight holds."""


class Communicator(ABC):
    """Collectives over one group of ranks. With a world of one, every call is the identity."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank = rank
        self.world_size = world_size

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor: ...

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor: ...

    @abstractmethod
    def barrier(self) -> None: ...

    def isend(self, tensor: torch.Tensor, dst: int) -> Any:
        """Start handing a pipeline stage's activations to the rank `dst` (a rank of the whole world, not of this
        group); the handle's wait() returns once the transfer is done."""
        raise NotImplementedError(f"{type(self).__name__} has no point-to-point transfers (pipeline parallel)")

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Fill `tensor` with what rank `src` sends."""
        raise NotImplementedError(f"{type(self).__name__} has no point-to-point transfers (pipeline parallel)")


class SingleRankCommunicator(Communicator):
    """The communicator of a world of one rank: nothing to exchange."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        return None


class TorchDistributedCommunicator(Communicator):
    """Collectives through torch.distributed over one group (None: every rank); the backend picks the
    process-group backend by name. Point-to-point transfers address ranks of the whole world."""

    def __init__(self, rank: int, world_size: int, group: Any = None) -> None:
        super().__init__(rank, world_size)
        self.group = group

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        torch.distributed.broadcast(tensor, src=src, group=self.group)
        return tensor

    def barrier(self) -> None:
        torch.distributed.barrier(group=self.group)

    def isend(self, tensor: torch.Tensor, dst: int) -> Any:
        return torch.distributed.isend(tensor.contiguous(), dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        torch.distributed.recv(tensor, src)
        return tensor


class _DoneEvent:
    def record(self) -> None:
        return None

    def synchronize(self) -> None:
        return None


@dataclass
class BackendFacts:
    """What `paged info` and the compatibility matrix print for a backend."""

    name: str
    available: bool
    reason: str
    device_type: str
    dist_backend: str
    dtypes: list[str] = field(default_factory=list)
    graphs: bool = False
    source: str = "built-in"


class Backend(ABC):
    """One vendor's hardware. Subclasses fill in the class facts and the abstract methods."""

    name: ClassVar[str]
    device_type: ClassVar[str]  # torch device type: "cpu", "cuda", "xla", "hpu"
    dist_backend: ClassVar[str]  # torch.distributed backend: "gloo", "nccl", "hccl", ...
    ray_resource: ClassVar[str] = "GPU"  # the Ray resource one rank's device is counted in: "GPU", "CPU", "HPU", ...
    visible_devices_env: ClassVar[str | None] = None  # e.g. CUDA_VISIBLE_DEVICES
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32,)
    supported_block_sizes: ClassVar[tuple[int, ...]] = (16,)
    # Quantization methods (paged.quant.registry names) this backend runs; each needs linear_kernel for its form.
    supported_quantizations: ClassVar[tuple[str, ...]] = ("gguf",)
    # KV cache dtypes beside "auto" (the model's): "fp8" stores e4m3 with per-layer scales (fp8_dtype's type).
    supported_kv_cache_dtypes: ClassVar[tuple[str, ...]] = ("auto",)
    # Whether the KV cache is sized from a fixed byte budget (host memory) or from a fraction of the
    # device memory left after profiling one forward pass.
    kv_cache_from_device_memory: ClassVar[bool] = True
    # Speculative decoding drafts only while at most this many sequences run (None: always), unless the user's
    # disable_by_batch_size says otherwise: where a step's cost grows with its tokens, checking k drafts for
    # every row of a large batch costs more than the tokens it saves.
    speculation_max_batch: ClassVar[int | None] = None

    # --- probing (class methods: they run before the backend is instantiated) ---

    @classmethod
    @abstractmethod
    def is_available(cls) -> Availability:
        """Whether this backend can run here. Must not initialise a device, and says why not."""

    # --- device facts ---

    @abstractmethod
    def device_count(self) -> int: ...

    @abstractmethod
    def device_name(self, index: int = 0) -> str: ...

    @abstractmethod
    def total_memory(self, index: int = 0) -> int: ...

    @abstractmethod
    def free_memory(self, index: int = 0) -> int: ...

    def peak_memory(self) -> int:
        """Bytes of device memory in use at the peak since reset_peak_memory (for KV cache sizing)."""
        return 0

    def reset_peak_memory(self) -> None:
        return None

    def device(self, index: int = 0) -> torch.device:
        return torch.device(self.device_type, index)

    def host_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host staging buffer for uploads; devices that can DMA from pinned memory pin it."""
        return torch.zeros(shape, dtype=dtype)

    def set_device(self, index: int) -> None:
        return None

    def place_rank(self, local_rank: int, local_ranks: int) -> None:
        """Take this rank's device, one of `local_ranks` ranks sharing this machine: device local_rank by
        default; a backend whose ranks share one device splits it instead."""
        self.set_device(local_rank % max(self.device_count(), 1))

    def synchronize(self) -> None:
        return None

    def event(self) -> Any:
        """A marker in the device's work queue: record() it, then synchronize() waits until the device has
        done everything queued before it. Devices that run synchronously need none."""
        return _DoneEvent()

    def empty_cache(self) -> None:
        return None

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def generator(self, seed: int) -> torch.Generator:
        """A random generator for sampling on this device (per-request seeds and the engine's own)."""
        return torch.Generator(device=self.device()).manual_seed(seed)

    def default_dtype(self) -> torch.dtype:
        """The compute dtype that `dtype="auto"` resolves to when the model's own is not supported."""
        return self.supported_dtypes[0]

    def precision(self, requested: torch.dtype | None, stored: torch.dtype | str | None) -> Precision:
        """What a model runs in: the requested dtype, or for `dtype="auto"` (requested None) the dtype the
        checkpoint is stored in where supported, else the backend's default. `stored` is that dtype, or for
        a GGUF the quantization type of most of its matrices ("Q4_1"), or None when unknown."""
        if requested is not None:
            return Precision(requested, requested, "requested")
        if stored in self.supported_dtypes:
            return Precision(stored, stored, "the checkpoint's dtype")
        dtype = self.default_dtype()
        return Precision(dtype, dtype, f"the {self.name} backend's default")

    def fp8_dtype(self) -> torch.dtype | None:
        return None

    # --- paged attention and the KV cache ---

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Layout of one layer's KV cache; the default is [2 (K, V), blocks, block_size, kv_heads, head_dim]."""
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def allocate_kv_cache(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """One layer's KV cache, zeroed: attention reads padded slots (masked), and garbage there could be NaN."""
        return torch.zeros(shape, dtype=dtype, device=self.device())

    def kv_cache_dtype(self, model_dtype: torch.dtype, requested: str = "auto") -> torch.dtype:
        """The dtype K/V are stored in: for "auto" the model's own unless the backend's attention prefers another;
        for "fp8" the backend's fp8 type."""
        if requested == "auto":
            return model_dtype
        # Storage only: a backend without FP8 arithmetic still keeps e4m3 and widens it to compute.
        fp8 = self.fp8_dtype() or torch.float8_e4m3fn
        if requested != "fp8" or requested not in self.supported_kv_cache_dtypes:
            raise ValueError(f"backend {self.name} has no {requested} KV cache (it has: "
                             f"{', '.join(self.supported_kv_cache_dtypes)})")
        return fp8

    @abstractmethod
    def attention(self, max_model_len: int) -> Attention:
        """The paged attention for models of this context length (split-K kernels size from it)."""

    def validate(self, head_dim: int, block_size: int, dtype: torch.dtype) -> list[str]:
        """Reasons this backend cannot run a model of these facts (empty when it can)."""
        reasons = []
        if block_size not in self.supported_block_sizes:
            reasons.append(f"block size {block_size} not in {list(self.supported_block_sizes)}")
        if dtype not in self.supported_dtypes:
            reasons.append(f"dtype {dtype} not in {[str(d) for d in self.supported_dtypes]}")
        return reasons

    # --- faster layer ops ---

    def ops(self, precision: Precision) -> dict[str, Callable[..., Any]]:
        """Faster versions of layer ops by name ("rms_norm", "add_rms_norm", "rotary", "silu_and_mul",
        and "linear", a LinearMethod) for a model of this precision.

        Models fall back to their plain-torch forward_native for any name missing here.
        """
        return {}

    def linear_kernel(self, form: str) -> LinearKernel | None:
        """The kernel for quantized weights of `form` ("int", "fp8", "int8": paged.quant.base.FORMS), or None
        where this backend has none."""
        return None

    def max_num_batched_tokens(self, num_parameters: int, max_num_seqs: int) -> int:
        """Tokens per step when the user sets none: a step must stay short enough that the requests it
        holds up (a client's abort, others' next tokens) wait a moment, not minutes."""
        return max(8192, max_num_seqs)

    def api_server_count(self, host_cores: int) -> int:
        """API server processes `paged serve` starts when --api-server-count is not given. With the model on
        an accelerator the host's cores are free for HTTP, tokenizing and SSE: one process per four cores,
        up to four (where one process caps near 17k streamed tokens/s on an H200 and four reach the core's rate)."""
        return max(1, min(4, host_cores // 4))

    @classmethod
    def describe(cls) -> list[str]:
        """Lines for `paged info` on what this backend found here and would use (instruction sets, paths).
        Like is_available, it must not initialise a device."""
        return []

    # --- collectives ---

    def max_ranks(self) -> int | None:
        """How many tensor-parallel ranks this machine holds: one per device; None where any number can share
        it (processes sharing a CPU's cores)."""
        return self.device_count()

    # Whether stages of a pipeline can hand activations on (the communicator's send and recv).
    supports_pipeline: ClassVar[bool] = True

    def communicator(self, rank: int = 0, world_size: int = 1, group: Any = None) -> Communicator:
        """The collectives of a group of `world_size` ranks in which this one is `rank`; `group`: the
        torch.distributed group holding them (None: the whole world)."""
        if world_size == 1 and group is None:
            return SingleRankCommunicator()
        return TorchDistributedCommunicator(rank, world_size, group)

    # --- graphs ---

    supports_graphs: ClassVar[bool] = False
    # Whether the engine may launch a greedy decode step before reading back the previous one's tokens
    # (fed to it on the device through its graph's input buffer): it needs queued, asynchronous launches.
    runs_ahead: ClassVar[bool] = False

    def capture_graph(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Record fn once and return a replay callable (only where supports_graphs)."""
        raise NotImplementedError(f"backend {self.name} cannot capture graphs")

    @classmethod
    def facts(cls, source: str = "built-in") -> BackendFacts:
        probe = cls.is_available()
        return BackendFacts(
            name=cls.name,
            available=probe.ok,
            reason=probe.reason,
            device_type=cls.device_type,
            dist_backend=cls.dist_backend,
            dtypes=[str(d).removeprefix("torch.") for d in cls.supported_dtypes],
            graphs=cls.supports_graphs,
            source=source,
        )
