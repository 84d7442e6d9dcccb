"""The offline API, shaped like vLLM's so existing scripts run by changing the import."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any, Sequence

from tqdm import tqdm

from paged.engine import LLMEngine
from paged.errors import UserError
from paged.outputs import RequestOutput
from paged.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | list[int] | dict[str, Any]
Message = dict[str, Any]


class LLM:
    """Generate for a batch of prompts at once: the engine batches them continuously until all finish.

    >>> llm = LLM()                       # SmolLM2-135M-Instruct on the detected device
    >>> out = llm.generate(["Hello"], SamplingParams(max_tokens=8))
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        self.engine = LLMEngine.from_kwargs(
            model=model, tokenizer=tokenizer, dtype=dtype, device=device, max_model_len=max_model_len, seed=seed,
            **kwargs,
        )

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs in the order of the prompts."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        # Offline callers read only the final outputs: skip building one per request per step.
        params = [replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                  for p in self._params_for(len(prompts), sampling_params)]
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(None, prompt, p))
        except UserError:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, rendered with the model's chat template (given
        `tools`, OpenAI-style function definitions, and `chat_template_kwargs`, as vLLM's LLM.chat)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {"prompt_token_ids": self.engine.render_chat(c, chat_template, add_generation_prompt, tools,
                                                         **(chat_template_kwargs or {}))}
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` samples with when given no SamplingParams: the model's sampling defaults
        (its generation_config, as with vLLM's --generation-config auto) over SamplingParams' own."""
        return SamplingParams(**self.engine.sampling_defaults)

    def _params_for(self, count: int, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if len(sampling_params) != count:
            raise UserError(f"{len(sampling_params)} sampling params for {count} prompts")
        return list(sampling_params)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Generating", unit=" req", file=sys.stderr, disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            self.engine.abort_request(request_ids)
            raise
        finally:
            bar.close()
        return [finished[i] for i in request_ids]
