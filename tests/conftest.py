"""Shared test setup: fast compiles and a persistent XLA compilation cache."""
from kd_jax import runtime

runtime.configure()
