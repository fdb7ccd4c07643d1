"""Test-wide settings: CPU, fp32 matmuls at full precision (FAMILIES.md §5.1 rule 8)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
