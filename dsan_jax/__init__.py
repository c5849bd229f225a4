"""dsan_jax: the Dual-Sampling Attention Network (Ouyang et al., IEEE TMI 2020) in JAX/Flax."""

__version__ = "0.1.0"
