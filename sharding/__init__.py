"""k2jax.sharding: the device mesh, the logical-axis rules table, expert-parallel dispatch and the
memory planner. Nothing runs at import time."""

from k2jax.sharding.mesh import (
    AXES,
    MeshError,
    check_mesh_fits,
    initialize_distributed,
    make_mesh,
    parse_mesh_spec,
)
from k2jax.sharding.rules import (
    RULES,
    ShardingRuleError,
    flax_rules,
    logical_specs,
    param_shardings,
    spec_for,
    use_mesh,
)

__all__ = [
    "AXES",
    "RULES",
    "MeshError",
    "ShardingRuleError",
    "check_mesh_fits",
    "flax_rules",
    "initialize_distributed",
    "logical_specs",
    "make_mesh",
    "param_shardings",
    "parse_mesh_spec",
    "spec_for",
    "use_mesh",
]
