"""The device mesh and multi-host start-up.

k2jax uses one 3-axis mesh, in this order (outermost first):

    data    data parallelism: replicas of everything but the batch
    expert  expert parallelism: routed experts split over it; outside the MoE it is another
            data-parallel axis (tokens are split over data × expert)
    tensor  tensor parallelism: attention heads, dense/shared MLP width and the vocabulary; inside
            the MoE it joins `expert` (experts are split over expert × tensor, see rules.py)

`tensor` is innermost so that its collectives (the most frequent) stay within a node's NVLink.
Axes are `AxisType.Auto`: sharding is propagated by XLA from the specs pinned on weights, the
batch and the layer boundaries, and the MoE runs in an explicit `shard_map`. (The rejected
alternative, `Explicit` axes — jax.make_mesh's default — needs an `out_sharding` on every
contraction over a sharded dimension, i.e. sharding decisions inside model code.)
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jax.sharding import Mesh

# jax is imported inside the functions: `k2jax plan` parses the mesh before jax may start.

log = logging.getLogger(__name__)

AXES = ("data", "expert", "tensor")


class MeshError(ValueError):
    """The requested mesh does not fit the devices or the model."""


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=1,expert=8,tensor=1' → {"data": 1, "expert": 8, "tensor": 1} (missing axes are 1)."""
    sizes = dict.fromkeys(AXES, 1)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes:
            raise MeshError(f"mesh axis {name!r} unknown; axes are {', '.join(AXES)}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise MeshError(f"mesh axis {name}={value!r}: expected an integer") from None
        if sizes[name] < 1:
            raise MeshError(f"mesh axis {name} must be >= 1, got {sizes[name]}")
    return sizes


def make_mesh(data: int = 1, expert: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A (data, expert, tensor) mesh over `devices` (default: all devices of all processes).

    The product of the axis sizes must equal the number of devices.
    """
    import jax
    from jax.sharding import AxisType

    devices = list(jax.devices() if devices is None else devices)
    sizes = (data, expert, tensor)
    if any(not isinstance(s, int) or s < 1 for s in sizes):
        raise MeshError(f"mesh axis sizes must be positive integers, got {sizes}")
    n = data * expert * tensor
    if n != len(devices):
        raise MeshError(
            f"mesh data={data} × expert={expert} × tensor={tensor} = {n} devices, but "
            f"{len(devices)} {'is' if len(devices) == 1 else 'are'} available "
            f"({devices[0].platform}); the product must equal the device count"
        )
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def check_mesh_fits(mesh: Mesh, cfg) -> None:
    """Clear errors, before any compute, for meshes the model cannot be split over."""
    e, t = mesh.shape["expert"], mesh.shape["tensor"]
    if cfg.n_routed_experts % (e * t):
        raise MeshError(
            f"{cfg.n_routed_experts} routed experts cannot be split over expert={e} × tensor={t} "
            f"= {e * t} devices (must divide)"
        )
    if cfg.num_attention_heads % t:
        raise MeshError(
            f"{cfg.num_attention_heads} attention heads cannot be split over tensor={t}"
        )
    for name, width in (
        ("intermediate_size", cfg.intermediate_size),
        ("shared expert width", cfg.shared_intermediate_size),
        ("vocab_size", cfg.vocab_size),
    ):
        if width and width % t:
            raise MeshError(f"{name} {width} cannot be split over tensor={t}")


def initialize_distributed(**kwargs) -> bool:
    """Starts jax.distributed when a multi-process environment is detected (or kwargs are given).

    Detected: an explicit coordinator (JAX_COORDINATOR_ADDRESS, or coordinator_address=...),
    SLURM with more than one task, Open MPI. Returns whether it initialised. Call it before anything
    touches devices; it is a no-op in a single process.
    """
    import jax

    if kwargs:
        jax.distributed.initialize(**kwargs)
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
        return True
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    mpi_size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    if slurm_tasks > 1 or mpi_size > 1:
        jax.distributed.initialize()  # jax's cluster auto-detection reads the environment
        return True
    return False
