"""paged: LLM inference and serving over a paged KV cache with continuous batching."""

from importlib.metadata import version
from typing import Any

__version__ = version("paged")  # setuptools-scm's, from the git tag the package was built at
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported lazily so `paged info` and `import paged.backends` stay quick.
    if name == "LLM":
        from paged.llm import LLM

        return LLM
    if name == "SamplingParams":
        from paged.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from paged import outputs

        return getattr(outputs, name)
    raise AttributeError(name)
