"""The frontend's side of the engine: text in, text out, around a core that only sees token ids.

InputProcessor tokenizes prompts, renders chat templates and checks requests against the model's limits,
producing CoreRequests. OutputProcessor turns the core's per-step CoreOutputs back into RequestOutputs:
incremental detokenization, stop strings (a sequence that hits one is ended here, and the core told to
abort it), decoded logprob tokens, and n sequences gathered into one output. Both need the tokenizer and
the model's facts, never the device, so an API server process runs them while the core process steps.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from paged.config import EngineConfig
from paged.core_protocol import CoreOutput, CoreRequest, TokenLogprobs
from paged.detokenizer import IncrementalDetokenizer
from paged.errors import UserError
from paged.model_source import ModelSource, sampling_defaults
from paged.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from paged.sampling_params import RequestOutputKind, SamplingParams
from paged.structured_output.backend import resolve_backend

logger = logging.getLogger(__name__)


def resolve_max_model_len(source: ModelSource, asked: int | None) -> int:
    """The context length: the model's, or what was asked for when that fits."""
    limit = getattr(source.hf_config, "max_position_embeddings", None) or 2048
    if asked is not None and asked > limit:
        raise UserError(f"max_model_len {asked} exceeds the model's context of {limit} tokens", param="max_model_len")
    return asked or limit


class InputProcessor:
    """Prompts and parameters into CoreRequests, every check a request can fail done here (a 400 at the API)."""

    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.config = config
        self.source = source
        self.tokenizer = None if config.skip_tokenizer_init else source.load_tokenizer()
        self.max_model_len = resolve_max_model_len(source, config.max_model_len)
        self.vocab_size = source.hf_config.vocab_size
        self.eos_token_ids = self._eos_token_ids()
        self.sampling_defaults = sampling_defaults(config.generation_config, source)

    def _eos_token_ids(self) -> frozenset[int]:
        ids = set()
        for found in (
            self.tokenizer.eos_token_id if self.tokenizer is not None else None,
            getattr(self.source.hf_config, "eos_token_id", None),
            self.source.generation_eos_token_ids(),
        ):
            ids.update(found if isinstance(found, list) else [found] if found is not None else [])
        return frozenset(ids)

    def tokenize_prompt(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        """A prompt as text, token ids or {"prompt_token_ids": [...]} / {"prompt": "..."}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise UserError("a prompt dict needs 'prompt' or 'prompt_token_ids'", param="prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("text prompts need a tokenizer; this engine runs with skip_tokenizer_init",
                                param="prompt")
            return prompt, self.tokenizer(prompt).input_ids
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise UserError("a prompt is a string or a list of token ids", param="prompt")
        return None, list(prompt)

    def render_chat(
        self, messages: list[dict], chat_template: str | None = None, add_generation_prompt: bool = True,
        tools: list[dict] | None = None, **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of a conversation rendered with the chat template (the model's, or a given one); `tools`
        (OpenAI's function definitions) and `template_kwargs` are the template's to use."""
        template = chat_template or self.config.chat_template
        if template and os.path.isfile(template):
            with open(template) as f:
                template = f.read()
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
                tools=tools, **template_kwargs,
            )
        except Exception as e:  # jinja2 and transformers raise many types for a bad template or messages
            raise UserError(f"cannot apply the chat template: {e}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise UserError("the prompt is empty", param="prompt")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})", param="prompt")
        if len(token_ids) >= self.max_model_len:
            raise UserError(
                f"the prompt is {len(token_ids)} tokens, which leaves no room to generate within "
                f"max_model_len={self.max_model_len}",
                param="prompt",
            )

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: limits of this engine and ids of this vocabulary."""
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.config.max_logprobs:
                raise UserError(f"at most {self.config.max_logprobs} logprobs may be asked for, got {k}", param=name)
        for name, ids in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise UserError(f"{name} token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                                param=name)
        constraint = params.structured_outputs
        if constraint is not None:
            if self.tokenizer is None:
                raise UserError("structured outputs need a tokenizer; this engine runs with skip_tokenizer_init",
                                param="structured_outputs")
            constraint.backend = _checked_backend(constraint.spec, self.config.structured_outputs_backend,
                                                  self.config.structured_outputs_any_whitespace)

    def make_request(self, request_id: str, token_ids: list[int], params: SamplingParams,
                     arrival_time: float | None = None, client_index: int = 0) -> CoreRequest:
        """The checked request, with max_tokens fitted to the context and the model's end-of-sequence ids."""
        self.check_prompt(token_ids)
        self.check_params(params)
        room = self.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        params = replace(params, max_tokens=max_tokens, min_tokens=min(params.min_tokens, max_tokens),
                         eos_token_ids=self.eos_token_ids)
        return CoreRequest(request_id, token_ids, params, arrival_time or time.monotonic(), client_index)


@functools.lru_cache(maxsize=1024)
def _checked_backend(spec, configured: str, any_whitespace: bool) -> str:
    """resolve_backend, remembered: clients send the same few schemas over and over (a refusal is not
    remembered: it raises)."""
    return resolve_backend(spec, configured, any_whitespace)


@dataclass
class _Sequence:
    """One of a request's n sequences, as the frontend has seen it so far."""

    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    times: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)


@dataclass
class _Group:
    """A user request: its prompt and its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    prompt_logprobs: list[PositionLogprobs | None] | None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.groups: dict[str, _Group] = {}

    def add(self, request: CoreRequest, prompt: str | None) -> None:
        params = request.params
        detokenize = params.detokenize and self.tokenizer is not None
        sequences = [_Sequence(i, IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params)
                               if detokenize else None, logprobs=[] if params.logprobs is not None else None)
                     for i in range(params.n)]
        self.groups[request.request_id] = _Group(
            request.request_id, prompt, request.prompt_token_ids, params, sequences,
            [None] if params.prompt_logprobs is not None else None)

    def drop(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.groups.pop(request_id, None)

    def abort(self, request_id: str) -> RequestOutput:
        """The request's output cut short: every unfinished sequence ends with finish_reason "abort"; forgotten."""
        group = self.groups.pop(request_id)
        for sequence in group.sequences:
            if sequence.finish_reason is None:
                sequence.finish_reason = "abort"
        return self._output(group)

    def has(self, request_id: str) -> bool:
        return request_id in self.groups

    def process(self, outputs: list[CoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """The RequestOutputs of the requests these outputs advanced, and the sequences to abort in the core
        (those a stop string ended). Finished requests are forgotten."""
        touched: dict[str, _Group] = {}
        to_abort: list[str] = []
        for out in outputs:
            group = self.groups.get(out.group_id)
            if group is None:
                continue  # aborted by the client meanwhile
            sequence = group.sequences[out.index]
            if sequence.finish_reason is not None:
                continue  # ended here by a stop string; the core's tokens after it are dropped
            if out.error is not None:
                raise UserError(out.error)
            group.num_cached_tokens = out.num_cached_tokens
            if out.prompt_logprobs is not None:
                self._add_prompt_logprobs(group, out.prompt_logprobs)
            if self._append(group, sequence, out):
                to_abort.append(out.request_id)
            touched[group.request_id] = group
        results = []
        for group in touched.values():
            if group.finished or group.params.output_kind is not RequestOutputKind.FINAL_ONLY:
                results.append(self._output(group))
            if group.finished:
                del self.groups[group.request_id]
        return results, to_abort

    def _append(self, group: _Group, sequence: _Sequence, out: CoreOutput) -> bool:
        """Take the sequence's new tokens; True if a stop string ended it here while the core runs it on.

        A stop string counts once min_tokens are out; where the core ended the sequence at the same token
        with EOS or a stop token, that reason stands; past a stop string, tokens are dropped."""
        sequence.times = out.times
        last = len(out.new_token_ids) - 1
        for i, token in enumerate(out.new_token_ids):
            sequence.token_ids.append(token)
            if sequence.logprobs is not None and out.new_logprobs is not None:
                sequence.logprobs.append(self._position(token, out.new_logprobs[i]))
            stop = sequence.detokenizer.append(token) if sequence.detokenizer is not None else None
            if stop is None or len(sequence.token_ids) < group.params.min_tokens:
                continue
            if i == last and out.finish_reason == "stop":
                break
            sequence.finish_reason, sequence.stop_reason = "stop", stop
            return out.finish_reason is None
        if out.finish_reason is not None:
            sequence.finish_reason, sequence.stop_reason = out.finish_reason, out.stop_reason
        return False

    def _decode(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else None

    def _position(self, token: int, found: TokenLogprobs) -> PositionLogprobs:
        entry = {token: Logprob(found.logprob, found.rank, self._decode(token))}
        for rank, (tid, lp) in enumerate(zip(found.top_ids, found.top_logprobs), start=1):
            entry.setdefault(tid, Logprob(lp, rank, self._decode(tid)))
        return entry

    def _add_prompt_logprobs(self, group: _Group, chunk) -> None:
        if group.prompt_logprobs is None or len(group.prompt_logprobs) != chunk.first_position:
            return  # another sequence of the request already scored these positions
        for i, found in enumerate(chunk.positions):
            group.prompt_logprobs.append(self._position(group.prompt_token_ids[chunk.first_position + i], found))

    def _output(self, group: _Group) -> RequestOutput:
        completions = []
        for s in group.sequences:
            logprobs = list(s.logprobs) if s.logprobs is not None else None
            cumulative = sum(next(iter(p.values())).logprob for p in logprobs) if logprobs else None
            text = s.detokenizer.visible_text(s.finish_reason is not None) if s.detokenizer is not None else ""
            completions.append(CompletionOutput(index=s.index, text=text, token_ids=list(s.token_ids),
                                                cumulative_logprob=cumulative, logprobs=logprobs,
                                                finish_reason=s.finish_reason, stop_reason=s.stop_reason))
        first = group.sequences[0].times
        metrics = {"arrival_time": first[0], "first_scheduled_time": first[1], "first_token_time": first[2],
                   "last_token_time": max(s.times[3] for s in group.sequences)}
        if group.params.max_tokens is not None:
            metrics["max_tokens"] = group.params.max_tokens
        return RequestOutput(request_id=group.request_id, prompt=group.prompt, prompt_token_ids=group.prompt_token_ids,
                             outputs=completions, finished=group.finished,
                             prompt_logprobs=list(group.prompt_logprobs) if group.prompt_logprobs is not None else None,
                             num_cached_tokens=group.num_cached_tokens, metrics=metrics)
