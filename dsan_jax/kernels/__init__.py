"""Optional native kernels. The pure-JAX path never needs them (``dsan_jax.runtime`` decides)."""
