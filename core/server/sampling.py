"""From an OpenAI request body to `SamplingParams`, and the checks that must pass before it is queued.

Shared by completions and chat: they differ only in where max_tokens and logprobs come from.
"""

from __future__ import annotations

from typing import Any

from paged.errors import UserError
from paged.sampling_params import SamplingParams
from paged.server.protocol import ResponseFormat, SamplingFields
from paged.structured_output import StructuredOutputsParams

# Request fields whose default comes from the model's generation_config when the client leaves them out.
_MODEL_DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def build_sampling_params(
    body: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
    defaults: dict[str, Any],
    structured_outputs: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """SamplingParams for `body`; a bad value raises UserError naming the field (a 400). `structured_outputs`:
    the constraint, when the endpoint made one (tool calls) rather than `structured_outputs_of(body)`."""
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
        structured_outputs=structured_outputs or structured_outputs_of(body),
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


def structured_outputs_of(body: SamplingFields) -> StructuredOutputsParams | None:
    """The one constraint the body asks for, from whichever field names it; two at once are a 400."""
    found = _constraints(body)
    if not found:
        return None
    if len(found) > 1:
        raise UserError(f"only one of {', '.join(found)} may constrain the output", param=sorted(found)[1])
    (field, constraint), = found.items()
    try:
        return StructuredOutputsParams(**constraint)
    except UserError as error:
        raise UserError(str(error), param=field) from None


def check_sampling_params(engine: Any, params: SamplingParams, body: SamplingFields) -> None:
    """The engine's checks of `params`; a refused constraint is a 400 naming the body field that sent it."""
    try:
        engine.check_params(params)
    except UserError as error:
        fields = list(_constraints(body))
        if error.param == "structured_outputs" and fields:
            raise UserError(str(error), param=fields[0]) from None
        raise


def _constraints(body: SamplingFields) -> dict[str, dict[str, Any]]:
    """Body field -> StructuredOutputsParams arguments, for each field that asks for a constraint."""
    found: dict[str, dict[str, Any]] = {}
    if body.response_format is not None and body.response_format.type != "text":
        if body.response_format.type == "json_object":
            found["response_format"] = {"json_object": True}
        elif body.response_format.type == "structural_tag":
            found["response_format"] = {"structural_tag": _structural_tag(body.response_format)}
        else:
            schema = body.response_format.json_schema
            if schema is None or schema.json_schema is None:
                raise UserError("response_format of type json_schema needs json_schema.schema", param="response_format")
            found["response_format"] = {"json": schema.json_schema}
    if body.structured_outputs is not None:
        asked = body.structured_outputs
        found["structured_outputs"] = {"json": asked.json_schema, "regex": asked.regex, "choice": asked.choice,
                                       "grammar": asked.grammar, "json_object": asked.json_object,
                                       "structural_tag": asked.structural_tag}
    for field, name in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                        ("guided_grammar", "grammar")):
        if getattr(body, field) is not None:
            found[field] = {name: getattr(body, field)}
    return found


def _structural_tag(response_format: ResponseFormat) -> dict[str, Any]:
    """A structural_tag response_format as the tag xgrammar reads: its `format`, or the older structures and
    triggers."""
    if response_format.format is not None:
        return {"type": "structural_tag", "format": response_format.format}
    if response_format.structures is None or response_format.triggers is None:
        raise UserError("response_format of type structural_tag needs format, or structures and triggers",
                        param="response_format")
    return {"structures": [s.model_dump(by_alias=True) for s in response_format.structures],
            "triggers": response_format.triggers}
