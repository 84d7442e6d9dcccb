"""What the server needs beyond the engine: names it answers to, its API key, limits, sampling defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from paged.server.errors import APIError

DEFAULT_MAX_BODY_BYTES = 16 << 20


@dataclass
class ServerSettings:
    served_model_names: list[str]
    model_root: str  # the model as the user named it, reported as the models' root (never a server path)
    api_key: str | None = None
    metrics_require_key: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    tool_call_parser: str | None = None  # a name in paged.server.tool_parsers.TOOL_PARSERS
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None  # a name in paged.server.reasoning.REASONING_PARSERS
    # CORS, as vLLM's defaults: any origin, method and header, no credentials.
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    enable_request_id_headers: bool = False
    # Sampling defaults for fields a request leaves out (the model's generation_config), SamplingParams names.
    generation_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        """The name metrics are labelled with and a request without `model` is answered as."""
        return self.served_model_names[0]

    def resolve_model(self, requested: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve, as OpenAI answers."""
        if requested is None:
            return self.model_name
        if requested not in self.served_model_names:
            raise APIError(404, f"The model `{requested}` does not exist.", param="model")
        return requested
