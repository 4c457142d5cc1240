"""Test set-up: 8 simulated CPU devices, float32-exact matmuls, and the torch reference runner.

The environment variables must be set before jax is imported anywhere, which is why they are at
the top of the first file pytest imports.
"""

import os

# 8 simulated devices for mesh tests. LLVM optimisation level 0: the tests compile hundreds of
# small programs and run each once, so compile time dominates (4x faster init of the tiny model);
# it does not change floating-point semantics (XLA:CPU never enables fast-math by default).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["TIKTOKEN_CACHE_DIR"] = ""

import jax
import pytest

# Parity with the torch reference is checked at 1e-5 in float32: no reduced-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def ref_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("reference")
