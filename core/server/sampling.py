"""From an OpenAI request body to `SamplingParams`, and the checks that must pass before it is queued.

Shared by completions and chat: they differ only in where max_tokens and logprobs come from.
"""

from __future__ import annotations

from typing import Any

from paged.errors import UserError
from paged.sampling_params import SamplingParams
from paged.server.protocol import SamplingFields

# Request fields whose default comes from the model's generation_config when the client leaves them out.
_MODEL_DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def build_sampling_params(
    body: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
    defaults: dict[str, Any],
) -> SamplingParams:
    """SamplingParams for `body`; a bad value raises UserError naming the field (a 400)."""
    chosen = {name: getattr(body, name) for name in _MODEL_DEFAULTED}
    model_defaults = {name: defaults[name] for name, value in chosen.items() if value is None and name in defaults}
    return SamplingParams(
        n=body.n,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=body.stop,
        stop_token_ids=body.stop_token_ids,
        include_stop_str_in_output=body.include_stop_str_in_output,
        ignore_eos=body.ignore_eos,
        max_tokens=max_tokens if max_tokens is not None else defaults.get("max_tokens"),
        min_tokens=body.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=body.logit_bias,
        skip_special_tokens=body.skip_special_tokens,
        spaces_between_special_tokens=body.spaces_between_special_tokens,
        **{name: value for name, value in chosen.items() if value is not None},
        **model_defaults,
    )


def check_context_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str) -> None:
    """The prompt plus the tokens asked for must fit the context; worded as vLLM (and OpenAI) word it."""
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise UserError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} in the "
            f"completion). Please reduce the length of the prompt or completion.",
            param=param,
        )


def check_request(body: SamplingFields) -> None:
    """What is checked before any tokenizing: fields this server does not implement, stream options."""
    body.check_extra_fields()
    if body.stream_options is not None and not body.stream:
        raise UserError("stream_options can only be set when stream is true", param="stream_options")
