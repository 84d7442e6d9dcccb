"""Shape buckets for backends whose compilers want static shapes (XLA on TPU, the Gaudi graph compiler).

Every distinct shape costs a compilation there, so ragged sizes (tokens in a step, sequences, blocks
per sequence) are padded up to the next bucket and only a handful of shapes is ever compiled. Buckets
are powers of two from a floor: padding never costs more than twice the work.
"""

from __future__ import annotations


def bucket(n: int, floor: int = 8) -> int:
    """The bucket n is padded to: the smallest power of two >= max(n, floor)."""
    if floor < 1 or floor & (floor - 1):
        raise ValueError(f"floor must be a power of two, got {floor}")
    return max(floor, 1 << max(n - 1, 0).bit_length())

