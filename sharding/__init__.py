"""k2jax.sharding: the device mesh and the logical-axis rules table — primitives that import
nothing else of k2jax (the expert-parallel dispatch is model code, k2jax/model/expert_parallel.py;
the memory planner is a tool over the train step, k2jax/train/planner.py). Nothing runs at
import time, and jax itself is imported on first use (so that `k2jax plan` can still choose how
many CPU devices jax simulates)."""

import importlib

_EXPORTS = {
    "AXES": "mesh",
    "MeshError": "mesh",
    "check_mesh_fits": "mesh",
    "initialize_distributed": "mesh",
    "make_mesh": "mesh",
    "parse_mesh_spec": "mesh",
    "RULES": "rules",
    "ShardingRuleError": "rules",
    "constrain": "rules",
    "flax_rules": "rules",
    "logical_specs": "rules",
    "mesh_axes": "rules",
    "param_shardings": "rules",
    "spec_for": "rules",
    "token_axes": "rules",
    "use_mesh": "rules",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"k2jax.sharding.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'k2jax.sharding' has no attribute {name!r}")
