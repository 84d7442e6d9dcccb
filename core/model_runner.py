"""Turns a scheduler decision into tensors, runs the model and samples: generic over backends.

Inputs are assembled on the host with NumPy in staging buffers (pinned where the backend has such a
thing) and copied once per step into persistent device buffers. Decode-only steps can replay a graph
captured for the next larger batch size of a ladder: the padding rows write nothing (slot -1) and
attend to nothing (context length 0), and their logits are dropped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from paged.backends.interface import AttentionMetadata, Backend
from paged.pipeline import Handoff, StageLinks
from paged.sampler import PLAIN_GREEDY, Sampler, SamplerOutput, build_sampling_batch, gather_logprobs
from paged.scheduler import SchedulerOutput
from paged.spec_decode.rejection import verify
from paged.structured_output.bitmask import GrammarBitmask, apply_grammar_bitmask


# Steps of several tokens a request are captured up to this batch size: speculation is for small batches.
MULTI_TOKEN_BATCH = 32


def _spread_rows(inputs: HostInputs, query_len: int) -> HostInputs:
    """Decode-padded inputs (one token per padding row) laid out as query_len tokens a row, each row's real
    tokens first. Padding tokens write nothing and their outputs are dropped; a row's context counts them (the
    kernels align a row's queries with the end of its context), so its real tokens see exactly their prefix."""
    rows = len(inputs.seq_lens)
    counts = np.diff(inputs.query_start_loc)
    row_of_token = np.repeat(np.arange(rows), counts)
    offset = np.arange(len(row_of_token)) - inputs.query_start_loc[:-1][row_of_token]
    index = row_of_token * query_len + offset

    def spread(values: np.ndarray, fill: int) -> np.ndarray:
        out = np.full(rows * query_len, fill, values.dtype)
        out[index] = values
        return out

    real = inputs.seq_lens > 0
    return HostInputs(
        input_ids=spread(inputs.input_ids, 0),
        positions=spread(inputs.positions, 0),
        slot_mapping=spread(inputs.slot_mapping, -1),
        query_start_loc=(np.arange(rows + 1) * query_len).astype(np.int32),
        seq_lens=np.where(real, inputs.seq_lens - counts + query_len, query_len).astype(np.int32),
        block_tables=inputs.block_tables,
        max_query_len=query_len,
    )


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: fine steps where batches are small, coarser above."""
    ladder = [1, 2, 4, 8, 16, 24, 32] + list(range(48, 513, 16))
    return [b for b in ladder if b < max_num_seqs] + [max_num_seqs]


@dataclass
class PromptLogprobChunk:
    """Log-probabilities of the prompt tokens one step covered, for one request."""

    first_position: int  # position of the first token scored (its logprob comes from the previous logits)
    token_logprobs: torch.Tensor
    ranks: torch.Tensor
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None


@dataclass
class StepResult:
    sampled: SamplerOutput | None  # rows follow the scheduled requests that complete this step
    prompt_logprobs: dict[str, PromptLogprobChunk]


# Stands for a token sampled by a step still in flight, until its value reaches the host.
PENDING_TOKEN = -1


@dataclass
class InFlightStep:
    """A launched greedy decode step whose tokens have not been read back yet."""

    requests: list  # the Request of each row
    row_of: dict[str, int]
    tokens: torch.Tensor  # [rows] on the device
    host: torch.Tensor  # the staging buffer the tokens are copied into (two alternate)
    host_tokens: torch.Tensor  # its first rows
    done: object = None  # the backend event recorded after the copy
    # Set while the tokens wait for a grammar's mask (ModelRunner.finish_greedy): the step's logits.
    logits: torch.Tensor | None = None
    indices: list[int] = field(default_factory=list)  # where each row's placeholder sits in its token list

    def token_ids(self) -> list[int]:
        self.done.synchronize()
        return self.host_tokens.tolist()


@dataclass
class SubmittedStep:
    """A step whose forward pass is launched and whose logits are not taken yet."""

    sched: SchedulerOutput
    starts: torch.Tensor  # query_start_loc of its rows, [rows + 1]
    hidden: torch.Tensor | None = None  # the final hidden states, with one pipeline stage
    handoff: Handoff | None = None  # stage 0's activations on their way through the other stages


@dataclass
class HostInputs:
    """One step's inputs as host arrays, rows in scheduling order."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray
    max_query_len: int


class BlockTableRows:
    """Each running request's block ids in a fixed row of one host array.

    Rebuilding the table from Python lists every step costs a conversion per request; here a step
    copies only the block ids added since the last one (one request in block_size, in steady decode).
    """

    def __init__(self, max_rows: int, width: int) -> None:
        self.table = np.zeros((max_rows, width), np.int32)
        self.filled = np.zeros(max_rows, np.int64)
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self.row_of: dict[str, int] = {}

    def rows(self, requests: list) -> np.ndarray:
        out = np.empty(len(requests), np.int64)
        for i, request in enumerate(requests):
            row = self.row_of.get(request.request_id)
            if row is None:
                row = self.row_of[request.request_id] = self.free_rows.pop()
                self.filled[row] = 0
            have, ids = self.filled[row], request.block_ids
            if len(ids) > have:
                self.table[row, have : len(ids)] = ids[have:]
                self.filled[row] = len(ids)
            out[i] = row
        return out

    def release(self, request_id: str) -> None:
        row = self.row_of.pop(request_id, None)
        if row is not None:
            self.free_rows.append(row)


class InputBuffers:
    """Device tensors at fixed addresses, and host staging arrays to fill them from.

    The staging arrays come in sets used in turn (two, or one per micro-batch a pipeline keeps in flight,
    and one more): a step launched without waiting for the previous ones must not overwrite what their
    copies may still be reading.
    """

    def __init__(self, backend: Backend, max_tokens: int, max_seqs: int, max_blocks: int, host_sets: int = 2
                 ) -> None:
        shapes = {
            "input_ids": ((max_tokens,), torch.int64),
            "positions": ((max_tokens,), torch.int64),
            "slot_mapping": ((max_tokens,), torch.int64),
            "query_start_loc": ((max_seqs + 1,), torch.int32),
            "seq_lens": ((max_seqs,), torch.int32),
            "block_tables": ((max_seqs, max_blocks), torch.int32),
            # Rows of a step run ahead that take a token still on the device, and the rows that hold them.
            "fed_rows": ((max_seqs,), torch.int64),
            "feeding_rows": ((max_seqs,), torch.int64),
            # A step with draft tokens: which tokens' logits it samples, and (rejection.verify) each sampled
            # row's draft then each request's first row.
            "logit_positions": ((max_tokens,), torch.int64),
            "verify_rows": ((max_tokens + max_seqs,), torch.int64),
        }
        device = backend.device()
        self.device = {k: torch.zeros(s, dtype=d, device=device) for k, (s, d) in shapes.items()}
        self.host_sets = [{k: backend.host_tensor(s, d) for k, (s, d) in shapes.items()} for _ in range(host_sets)]
        self.turn = 0
        self.host = self.host_sets[0]

    def flip(self) -> None:
        """Stage the next step's inputs in the next set of host arrays."""
        self.turn = (self.turn + 1) % len(self.host_sets)
        self.host = self.host_sets[self.turn]

    def upload(self, name: str, values: np.ndarray) -> torch.Tensor:
        """Copy values into the front of the named buffer (through its staging array); returns that view."""
        index = tuple(slice(0, n) for n in values.shape)
        staging = self.host[name][index]
        staging.numpy()[...] = values
        view = self.device[name][index]
        view.copy_(staging, non_blocking=True)
        return view

    def metadata(self, inputs: HostInputs, block_size: int, max_seq_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.upload("slot_mapping", inputs.slot_mapping),
            query_start_loc=self.upload("query_start_loc", inputs.query_start_loc),
            seq_lens=self.upload("seq_lens", inputs.seq_lens),
            block_tables=self.upload("block_tables", inputs.block_tables),
            max_query_len=inputs.max_query_len,
            max_seq_len=max_seq_len,
            block_size=block_size,
        )


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        backend: Backend,
        block_size: int,
        max_num_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        vocab_size: int,
        seed: int,
        samples: bool = True,
        links: StageLinks | None = None,
    ) -> None:
        """`samples`: False on the ranks other than 0, which run the forward pass only. `links`: this rank's
        pipeline stage, where there are several (only stage 0 computes logits)."""
        self.model = model
        self.backend = backend
        self.links = links
        self.attention = model.attention
        self.num_layers = len(model.model.stage_layers)  # this stage's, each with a KV cache here
        self.kv_caches: list[torch.Tensor] = []
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.vocab_size = vocab_size
        self.samples = samples
        self.device = backend.device()
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.sampler = Sampler()
        self.generator = backend.generator(seed)
        self.buffers = InputBuffers(backend, max_num_tokens, max_num_seqs, self.max_blocks_per_seq,
                                    2 if links is None else links.layout.pipeline + 1)
        self.block_rows = BlockTableRows(max_num_seqs, self.max_blocks_per_seq)
        # (batch size, tokens per request) -> its captured step
        self.graphs: dict[tuple[int, int], Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {}
        self.token_staging = [backend.host_tensor((max_num_seqs,), torch.int64) for _ in range(2)]
        self.graph_sizes: list[int] = []  # ascending, of decode graphs
        self.multi_token_sizes: list[int] = []  # ascending, of graphs of multi_token tokens a request
        self.multi_token = 1
        self.graph_buffers: InputBuffers | None = None
        self.graph_query_starts: dict[int, torch.Tensor] = {}  # tokens per request -> [max batch + 1] starts

    # --- inputs ---------------------------------------------------------------------------------

    def release(self, request_id: str) -> None:
        """The request left the running batch (finished, aborted or preempted): free its table row."""
        self.block_rows.release(request_id)

    def shutdown(self) -> None:
        """Nothing runs beside this process."""

    def host_inputs(self, sched: SchedulerOutput, pad_to: int | None = None) -> HostInputs:
        scheduled = sched.scheduled
        rows = pad_to or len(scheduled)
        starts = np.fromiter((s.request.num_computed_tokens for s in scheduled), np.int64, len(scheduled))
        counts = np.fromiter((s.num_new_tokens for s in scheduled), np.int64, len(scheduled))
        seq_lens = np.zeros(rows, np.int32)
        seq_lens[: len(scheduled)] = starts + counts
        query_start_loc = np.arange(rows + 1, dtype=np.int32)  # padding rows: one (ignored) query token each
        np.cumsum(counts, out=query_start_loc[1 : len(scheduled) + 1])
        num_tokens = int(query_start_loc[len(scheduled)])
        query_start_loc[len(scheduled) + 1 :] += num_tokens - len(scheduled)

        token_ids: list[int] = []
        for s in scheduled:
            start = s.request.num_computed_tokens
            token_ids.extend(s.request.token_ids[start : start + s.num_new_tokens])
            token_ids.extend(s.draft_token_ids)  # scheduled only after every known token
        seq_of_token = np.repeat(np.arange(len(scheduled)), counts)
        positions = np.arange(num_tokens, dtype=np.int64) - query_start_loc[:-1][seq_of_token] + starts[seq_of_token]

        width = self.max_blocks_per_seq if pad_to else int(-(-seq_lens.max() // self.block_size))
        table_rows = self.block_rows.rows([s.request for s in scheduled])
        block_tables = np.zeros((rows, width), np.int32)
        block_tables[: len(scheduled)] = self.block_rows.table[table_rows, :width]
        slots = block_tables[seq_of_token, positions // self.block_size].astype(np.int64) * self.block_size
        slots += positions % self.block_size

        padding = rows - len(scheduled)
        return HostInputs(
            input_ids=np.concatenate([np.asarray(token_ids, np.int64), np.zeros(padding, np.int64)]),
            positions=np.concatenate([positions, np.zeros(padding, np.int64)]),
            slot_mapping=np.concatenate([slots, np.full(padding, -1, np.int64)]),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            max_query_len=int(counts.max()),
        )

    def prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        inputs = self.host_inputs(sched)
        meta = self.buffers.metadata(inputs, self.block_size, int(inputs.seq_lens.max()))
        meta.prepared = self.attention.prepare(meta)
        return self.buffers.upload("input_ids", inputs.input_ids), self.buffers.upload("positions", inputs.positions), meta

    # --- running ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        shape = self._graph_shape(sched)
        if shape is None:
            return self.collect(self.submit(sched))
        size, query_len = shape
        self._upload_graph_inputs(sched, size, query_len)
        logits = self.graphs[shape]()[0]
        completing = list(range(len(sched.scheduled)))  # a graph step's rows all complete
        if query_len == 1:
            logits = logits[: len(sched.scheduled)]
        else:  # rows of query_len tokens each, their real ones first
            logits = logits[self._logit_positions(sched, completing, np.arange(len(completing)) * query_len)]
        if not self.samples:
            return StepResult(None, {})
        drafted = any(s.draft_token_ids for s in sched.scheduled)
        return StepResult((self._verify if drafted else self._sample)(sched, completing, logits), {})

    @torch.inference_mode()
    def submit(self, sched: SchedulerOutput) -> SubmittedStep:
        """Launch a step's forward pass; with pipeline stages, return once this stage's share is handed on,
        so the core can submit the next micro-batch before this one comes back."""
        if self.links is not None:
            self.buffers.flip()  # earlier micro-batches' copies may still read the other staging sets
        input_ids, positions, meta = self.prepare(sched)
        if self.links is None:  # collected at once: nothing overwrites the inputs before
            return SubmittedStep(sched, meta.query_start_loc,
                                 hidden=self.model(input_ids, positions, self.kv_caches, meta))
        # The next micro-batch's inputs overwrite the buffer before this one is collected.
        return SubmittedStep(sched, meta.query_start_loc.clone(),
                             handoff=self.links.start(self.model, input_ids, positions, self.kv_caches, meta))

    @torch.inference_mode()
    def collect(self, step: SubmittedStep) -> StepResult:
        """A submitted step's logits, prompt logprobs and samples (nothing on a later pipeline stage)."""
        sched = step.sched
        hidden = step.hidden if self.links is None else self.links.finish(step.handoff)
        if hidden is None:
            return StepResult(None, {})
        prompt_logprobs = self._prompt_logprobs(sched, hidden, step.starts)
        completing = [i for i, s in enumerate(sched.scheduled) if s.completes]
        if not completing:
            return StepResult(None, prompt_logprobs)
        if any(s.draft_token_ids for s in sched.scheduled):
            starts = np.concatenate([[0], np.cumsum([s.num_new_tokens for s in sched.scheduled])[:-1]])
            logits = self.model.compute_logits(hidden[self._logit_positions(sched, completing, starts)])
            return StepResult(self._verify(sched, completing, logits) if self.samples else None, prompt_logprobs)
        ends = step.starts[1:].long() - 1
        logits = self.model.compute_logits(hidden[ends[completing] if len(completing) < len(sched.scheduled) else ends])
        return StepResult(self._sample(sched, completing, logits) if self.samples else None, prompt_logprobs)

    def _logit_positions(self, sched: SchedulerOutput, completing: list[int], starts: np.ndarray) -> torch.Tensor:
        """Where in the step's tokens the logits to sample are (each scheduled request's first token at starts[i]):
        each completing request's last known token and its drafts, request after request."""
        ends = [starts[i] + sched.scheduled[i].num_new_tokens - 1 for i in range(len(sched.scheduled))]
        positions = np.concatenate([np.arange(ends[i] - len(sched.scheduled[i].draft_token_ids), ends[i] + 1)
                                    for i in completing])
        return self.buffers.upload("logit_positions", positions)

    def _verify(self, sched: SchedulerOutput, completing: list[int], logits: torch.Tensor) -> SamplerOutput:
        """Sample a step with draft tokens: each completing request's rows checked by rejection.verify."""
        scheduled = [sched.scheduled[i] for i in completing]
        counts = [len(s.draft_token_ids) + 1 for s in scheduled]
        first_rows = np.concatenate([[0], np.cumsum(counts)[:-1]])
        if sched.grammar is not None:  # rows laid out as here: each request's last known token, then its drafts
            apply_grammar_bitmask(logits, sched.grammar())
        drafts = [token for s in scheduled for token in (*s.draft_token_ids, -1)]
        batch = PLAIN_GREEDY
        if not all(s.request.params.plain_greedy for s in scheduled):  # per-row histories only where read
            params, prompts, outputs, generators = [], [], [], []
            for s in scheduled:
                request = s.request
                for j in range(len(s.draft_token_ids) + 1):
                    params.append(request.params)
                    prompts.append(request.prompt_token_ids)
                    outputs.append(request.output_token_ids + s.draft_token_ids[:j])
                    generators.append(request.generator)
            batch = build_sampling_batch(params, prompts, outputs, generators, self.vocab_size, self.device)
        device_rows = self.buffers.upload("verify_rows", np.concatenate([drafts, first_rows]).astype(np.int64))
        return verify(logits, batch, device_rows[: len(drafts)], device_rows[len(drafts) :], self.generator)

    def _sample(self, sched: SchedulerOutput, completing: list[int], logits: torch.Tensor) -> SamplerOutput:
        rows = [sched.scheduled[i].request for i in completing]
        if sched.grammar is not None:
            apply_grammar_bitmask(logits, sched.grammar())
        if all(r.params.plain_greedy for r in rows):
            return self.sampler(logits, PLAIN_GREEDY, self.generator)
        batch = build_sampling_batch(
            [r.params for r in rows],
            [r.prompt_token_ids for r in rows],
            [r.output_token_ids for r in rows],
            [r.generator for r in rows],
            self.vocab_size,
            self.device,
        )
        return self.sampler(logits, batch, self.generator)

    def _prompt_logprobs(self, sched: SchedulerOutput, hidden: torch.Tensor, starts: torch.Tensor
                         ) -> dict[str, PromptLogprobChunk]:
        """Score the prompt tokens this step covered, for requests that asked for prompt logprobs."""
        chunks = {}
        for i, s in enumerate(sched.scheduled):
            request, start = s.request, s.request.num_computed_tokens
            k = request.params.prompt_logprobs
            if k is None or request.num_output_tokens:
                continue
            # Logits at position p score token p + 1; the last prompt position scores the first output.
            end = min(start + s.num_new_tokens, request.num_prompt_tokens - 1)
            if end > start:
                offset = int(starts[i])
                logits = self.model.compute_logits(hidden[offset : offset + end - start])
                targets = torch.tensor(request.token_ids[start + 1 : end + 1], device=self.device)
                lp, rank, top_ids, top_lp = gather_logprobs(torch.log_softmax(logits, dim=-1), targets, k)
                chunks[request.request_id] = PromptLogprobChunk(start + 1, lp, rank, top_ids, top_lp)
        return chunks

    # --- graphs -----------------------------------------------------------------------------------

    def capture_graphs(self, multi_token: int = 1) -> list[int]:
        """Capture one decode step per batch size of the ladder, largest first so smaller ones reuse memory;
        with `multi_token` > 1 also steps of up to that many tokens a request (a request's last token and its
        drafts, or a draft model catching up), for batches up to MULTI_TOKEN_BATCH. Returns the decode sizes."""
        sizes = graph_batch_sizes(self.max_num_seqs)
        multi_sizes = graph_batch_sizes(min(self.max_num_seqs, MULTI_TOKEN_BATCH)) if multi_token > 1 else []
        self.graph_buffers = InputBuffers(self.backend, max(sizes[-1], (multi_sizes or [0])[-1] * multi_token),
                                          sizes[-1], self.max_blocks_per_seq)
        # Each graph's query starts, fixed for its life: replays never upload them. Held here, as every tensor a
        # graph reads must be, since a captured graph does not keep its inputs alive.
        self.graph_query_starts = {q: (torch.arange(sizes[-1] + 1, dtype=torch.int32) * q).to(self.device)
                                   for q in {1, multi_token}}
        for query_len, ladder in ((multi_token, multi_sizes), (1, sizes)):
            for size in reversed(ladder):
                self.graphs[size, query_len] = self.backend.capture_graph(self._graph_forward(size, query_len))
        self.graph_sizes, self.multi_token_sizes, self.multi_token = sizes, multi_sizes, multi_token
        return sizes

    def _graph_forward(self, size: int, query_len: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """A step of `size` requests of `query_len` tokens each (logits for every token)."""
        buffers, tokens = self.graph_buffers, size * query_len
        meta = AttentionMetadata(
            slot_mapping=buffers.device["slot_mapping"][:tokens],
            query_start_loc=self.graph_query_starts[query_len][: size + 1],
            seq_lens=buffers.device["seq_lens"][:size],
            block_tables=buffers.device["block_tables"][:size],
            max_query_len=query_len,
            max_seq_len=self.max_model_len,
            block_size=self.block_size,
        )
        buffers.device["slot_mapping"][:tokens].fill_(-1)  # capture-time warm-up must not write the cache
        buffers.device["seq_lens"][:size].fill_(query_len)
        meta.prepared = self.attention.prepare(meta)
        input_ids, positions = buffers.device["input_ids"][:tokens], buffers.device["positions"][:tokens]

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.model.compute_logits(self.model(input_ids, positions, self.kv_caches, meta))
            return logits, logits.argmax(dim=-1)  # greedy tokens come with the graph: no launch of their own

        return forward

    def _graph_shape(self, sched: SchedulerOutput) -> tuple[int, int] | None:
        """The captured (batch size, tokens per request) to replay for this step, or None to run eagerly."""
        if not self.graph_sizes or any(not s.completes or s.request.params.prompt_logprobs is not None
                                       for s in sched.scheduled):
            return None
        longest = max(s.num_new_tokens for s in sched.scheduled)
        if longest == 1:
            sizes, query_len = self.graph_sizes, 1
        elif longest <= self.multi_token and all(s.request.num_computed_tokens + self.multi_token <= self.max_model_len
                                                 for s in sched.scheduled):
            sizes, query_len = self.multi_token_sizes, self.multi_token  # padded rows' keys stay in the table
        else:
            return None
        if not sizes or len(sched.scheduled) > sizes[-1]:
            return None
        return sizes[bisect.bisect_left(sizes, len(sched.scheduled))], query_len

    def _upload_graph_inputs(self, sched: SchedulerOutput, size: int, query_len: int) -> None:
        inputs = self.host_inputs(sched, pad_to=size)
        if query_len > 1:
            inputs = _spread_rows(inputs, query_len)
        buffers = self.graph_buffers
        buffers.flip()
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables"):
            buffers.upload(name, getattr(inputs, name))

    def launch_greedy(self, sched: SchedulerOutput, previous: InFlightStep | None, masked: bool = False
                      ) -> InFlightStep | None:
        """Launch a plain-greedy decode step and return without waiting for it (None: not possible).

        Tokens still in flight from `previous` (the placeholders in the requests' token lists) are fed
        to this step on the device, so the host never waits for them before launching. `masked`: some
        rows follow a grammar, whose mask needs `previous`'s tokens on the host; the step's tokens wait
        for finish_greedy, which the host calls once it has them, while this step's forward pass runs.
        """
        shape = self._graph_shape(sched)
        if shape is None or shape[1] != 1:
            return None
        size = shape[0]
        self._upload_graph_inputs(sched, size, 1)
        if previous is not None:
            dst, src = [], []
            for row, s in enumerate(sched.scheduled):
                if s.request.token_ids[s.request.num_computed_tokens] == PENDING_TOKEN:
                    dst.append(row)
                    src.append(previous.row_of[s.request.request_id])
            if dst:
                buffers = self.graph_buffers
                fed, feeding = (buffers.upload(name, np.asarray(rows, np.int64))
                                for name, rows in (("fed_rows", dst), ("feeding_rows", src)))
                buffers.device["input_ids"].index_copy_(0, fed, previous.tokens.index_select(0, feeding))
        logits, tokens = self.graphs[shape]()
        rows = len(sched.scheduled)
        staging = self.token_staging[0] if previous is None or previous.host is self.token_staging[1] \
            else self.token_staging[1]
        requests = [s.request for s in sched.scheduled]
        flight = InFlightStep(requests, {r.request_id: i for i, r in enumerate(requests)}, tokens[:rows], staging,
                              staging[:rows])
        if masked:
            flight.logits = logits[:rows]
        else:
            self._read_back(flight)
        return flight

    def finish_greedy(self, flight: InFlightStep, grammar: GrammarBitmask | None) -> None:
        """The tokens of a step launched `masked`: the argmax over its logits with the grammar's mask applied
        (None: no row's grammar is active, the graph's argmax stands), then their copy to the host."""
        if grammar is not None:
            apply_grammar_bitmask(flight.logits, grammar)
            flight.tokens = flight.logits.argmax(dim=-1)
        flight.logits = None
        self._read_back(flight)

    def _read_back(self, flight: InFlightStep) -> None:
        flight.host_tokens.copy_(flight.tokens, non_blocking=True)
        flight.done = self.backend.event()
        flight.done.record()

    # --- profiling --------------------------------------------------------------------------------

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, kv_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """The largest step the scheduler can make (num_tokens tokens, as many sequences as allowed, each
        sampling), over a throwaway one-sequence KV cache per layer of this stage: it measures peak
        activation memory."""
        num_seqs = min(self.max_num_seqs, num_tokens)
        counts = np.full(num_seqs, num_tokens // num_seqs, np.int64)
        counts[: num_tokens % num_seqs] += 1
        counts = np.minimum(counts, self.max_model_len)
        query_start_loc = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        total = int(query_start_loc[-1])
        positions = np.concatenate([np.arange(c) for c in counts]).astype(np.int64)
        inputs = HostInputs(
            input_ids=np.zeros(total, np.int64), positions=positions, slot_mapping=np.full(total, -1, np.int64),
            query_start_loc=query_start_loc, seq_lens=counts.astype(np.int32),
            block_tables=np.zeros((num_seqs, self.max_blocks_per_seq), np.int32), max_query_len=int(counts.max()),
        )
        meta = self.buffers.metadata(inputs, self.block_size, int(counts.max()))
        meta.prepared = self.attention.prepare(meta)
        caches = [torch.zeros(kv_shape, dtype=dtype, device=self.device) for _ in range(self.num_layers)]
        input_ids, positions = self.buffers.upload("input_ids", inputs.input_ids), \
            self.buffers.upload("positions", inputs.positions)
        if self.links is None:
            hidden = self.model(input_ids, positions, caches, meta)
        else:
            hidden = self.links.finish(self.links.start(self.model, input_ids, positions, caches, meta))
        if hidden is not None:
            self.model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1]).argmax(dim=-1)
        self.backend.synchronize()
