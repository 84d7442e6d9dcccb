"""Turns a scheduler decision into tensors, runs the model and samples: generic over backends.

Inputs are assembled on the host with NumPy and copied once per step into persistent device buffers,
so a backend that replays captured graphs finds them at fixed addresses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from paged.backends.interface import AttentionMetadata, Backend
from paged.sampler import Sampler, SamplerOutput, build_sampling_batch, gather_logprobs
from paged.scheduler import SchedulerOutput


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


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        backend: Backend,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_num_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        vocab_size: int,
        seed: int,
    ) -> None:
        self.model = model
        self.backend = backend
        self.attention = model.model.layers[0].self_attn.attn
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = backend.device()
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.sampler = Sampler()
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.buffers = {
            "input_ids": torch.zeros(max_num_tokens, dtype=torch.int64, device=self.device),
            "positions": torch.zeros(max_num_tokens, dtype=torch.int64, device=self.device),
            "slot_mapping": torch.zeros(max_num_tokens, dtype=torch.int64, device=self.device),
            "query_start_loc": torch.zeros(max_num_seqs + 1, dtype=torch.int32, device=self.device),
            "seq_lens": torch.zeros(max_num_seqs, dtype=torch.int32, device=self.device),
            "block_tables": torch.zeros(max_num_seqs, self.max_blocks_per_seq, dtype=torch.int32, device=self.device),
        }

    def _upload(self, name: str, host: np.ndarray) -> torch.Tensor:
        """Copy a host array into the front of its persistent buffer and return that view."""
        view = self.buffers[name][tuple(slice(0, n) for n in host.shape)]
        view.copy_(torch.from_numpy(host), non_blocking=True)
        return view

    def prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        scheduled = sched.scheduled
        starts = np.fromiter((s.request.num_computed_tokens for s in scheduled), np.int64, len(scheduled))
        counts = np.fromiter((s.num_new_tokens for s in scheduled), np.int64, len(scheduled))
        seq_lens = starts + counts
        query_start_loc = np.zeros(len(scheduled) + 1, np.int32)
        np.cumsum(counts, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])

        token_ids: list[int] = []
        for s in scheduled:
            start = s.request.num_computed_tokens
            token_ids.extend(s.request.token_ids[start : start + s.num_new_tokens])
        seq_of_token = np.repeat(np.arange(len(scheduled)), counts)
        positions = np.arange(num_tokens, dtype=np.int64) - query_start_loc[:-1][seq_of_token] + starts[seq_of_token]

        width = int(-(-seq_lens.max() // self.block_size))
        block_tables = np.zeros((len(scheduled), width), np.int32)
        for row, s in enumerate(scheduled):
            ids = s.request.block_ids
            block_tables[row, : len(ids)] = ids
        slots = block_tables[seq_of_token, positions // self.block_size].astype(np.int64) * self.block_size
        slots += positions % self.block_size

        meta = AttentionMetadata(
            slot_mapping=self._upload("slot_mapping", slots),
            query_start_loc=self._upload("query_start_loc", query_start_loc),
            seq_lens=self._upload("seq_lens", seq_lens.astype(np.int32)),
            block_tables=self._upload("block_tables", block_tables),
            max_query_len=int(counts.max()),
            max_seq_len=int(seq_lens.max()),
            block_size=self.block_size,
        )
        meta.prepared = self.attention.prepare(meta)
        input_ids = self._upload("input_ids", np.asarray(token_ids, dtype=np.int64))
        return input_ids, self._upload("positions", positions), meta

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        input_ids, positions, meta = self.prepare(sched)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        ends = meta.query_start_loc[1:].long() - 1
        completing = [i for i, s in enumerate(sched.scheduled) if s.completes]
        prompt_logprobs = self._prompt_logprobs(sched, hidden)

        sampled = None
        if completing:
            rows = [sched.scheduled[i].request for i in completing]
            index = ends[completing] if len(completing) < len(sched.scheduled) else ends
            logits = self.model.compute_logits(hidden[index])
            batch = build_sampling_batch(
                [r.params for r in rows],
                [r.prompt_token_ids for r in rows],
                [r.output_token_ids for r in rows],
                [r.generator for r in rows],
                self.vocab_size,
                self.device,
            )
            sampled = self.sampler(logits, batch, self.generator)
        return StepResult(sampled, prompt_logprobs)

    def _prompt_logprobs(self, sched: SchedulerOutput, hidden: torch.Tensor) -> dict[str, PromptLogprobChunk]:
        """Score the prompt tokens this step covered, for requests that asked for prompt logprobs."""
        chunks = {}
        offset = 0
        for s in sched.scheduled:
            request, start = s.request, s.request.num_computed_tokens
            k = request.params.prompt_logprobs
            # Logits at position p score token p + 1; the last prompt position scores the first output.
            end = min(start + s.num_new_tokens, request.num_prompt_tokens - 1)
            if k is not None and request.num_output_tokens == 0 and end > start:
                logits = self.model.compute_logits(hidden[offset : offset + end - start])
                targets = torch.tensor(request.token_ids[start + 1 : end + 1], device=self.device)
                lp, rank, top_ids, top_lp = gather_logprobs(torch.log_softmax(logits, dim=-1), targets, k)
                chunks[request.request_id] = PromptLogprobChunk(start + 1, lp, rank, top_ids, top_lp)
            offset += s.num_new_tokens
        return chunks
