"""Test-wide settings: CPU, fp32 matmuls at full precision (FAMILIES.md §5.1 rule 8)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Ahead-of-time TPU compilation loads libtpu in several test processes at once (xdist workers,
# subprocess workers); they only compile, so sharing libtpu's lockfile is safe.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
