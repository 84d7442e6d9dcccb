"""`--speculative-config`, spelled as vLLM spells it."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Methods vLLM names that this engine does not run yet: refused in one line rather than ignored.
_NOT_BUILT = ("eagle", "eagle3", "medusa", "mlp_speculator", "mtp", "suffix")


class SpeculativeConfig(BaseModel):
    """How tokens are proposed; an unknown key is an error, since each one would change what runs."""

    model_config = ConfigDict(extra="forbid")

    # ngram: prompt lookup; draft_model: a smaller model of the same vocabulary (the default where `model` is set).
    method: Literal["ngram", "draft_model"] = "ngram"
    model: str | None = None  # the draft model: a folder or .gguf file, as --model takes
    num_speculative_tokens: int = Field(gt=0, le=64)
    # n-gram prompt lookup: the longest suffix of prompt_lookup_max .. prompt_lookup_min tokens found earlier
    # in the sequence (prompt and output) proposes the tokens that followed it there.
    prompt_lookup_max: int | None = Field(default=None, gt=0)
    prompt_lookup_min: int | None = Field(default=None, gt=0)
    # No proposals while more sequences than this run: a large batch is bound by compute, where checking
    # guesses costs more than it saves, and plain decode steps can run ahead on graphs. None: the backend's
    # own limit (Backend.speculation_max_batch).
    disable_by_batch_size: int | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _method(cls, values: dict) -> dict:
        if not isinstance(values, dict):
            return values
        if values.get("method") in ("[ngram]",):
            values = {**values, "method": "ngram"}
        if values.get("method") is None and values.get("model") is not None:
            values = {**values, "method": "draft_model"}
        if values.get("method") in _NOT_BUILT:
            raise ValueError(f"method {values['method']!r} is not implemented; this engine runs 'ngram' and "
                             "'draft_model'")
        return values

    @model_validator(mode="after")
    def _lookup_bounds(self) -> SpeculativeConfig:
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError("method 'draft_model' needs a model, and only it takes one")
        # As vLLM: either bound defaults to the other, both to 5.
        if self.prompt_lookup_max is None:
            self.prompt_lookup_max = self.prompt_lookup_min or 5
        if self.prompt_lookup_min is None:
            self.prompt_lookup_min = self.prompt_lookup_max
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min {self.prompt_lookup_min} is above prompt_lookup_max "
                             f"{self.prompt_lookup_max}")
        return self


def parse_speculative_config(value: str | dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
    """The config from a JSON string (the CLI's), a dict (the LLM API's) or itself; a ValueError saying what
    is wrong, in one line."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"not JSON: {error}") from None
    try:
        return SpeculativeConfig.model_validate(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}") from None
