"""Hardware backends: the interface, the registry that finds them and the built-in vendors."""

from paged.backends.interface import Attention, AttentionMetadata, Availability, Backend, Communicator

__all__ = ["Attention", "AttentionMetadata", "Availability", "Backend", "Communicator"]
