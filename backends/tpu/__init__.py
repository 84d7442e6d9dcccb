"""Google TPUs through JAX and torchax; nothing here imports jax until the backend is probed or used."""
