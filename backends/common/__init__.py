"""Helpers more than one vendor backend uses (shape buckets for static-shape compilers)."""
