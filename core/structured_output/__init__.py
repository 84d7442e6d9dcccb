"""Structured output: outputs constrained to a JSON schema, a regex, a choice or a grammar."""

from paged.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
