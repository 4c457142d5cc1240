"""One process of the two-process test (tests/test_multihost.py); not a test module itself.

    python worker.py PROCESS_ID NUM_PROCESSES PORT OUT_PREFIX STEPS

Each process owns 4 CPU devices; jax.distributed joins them into 8 global devices and gloo carries
the collectives. Both processes build the same tiny model and batches from fixed seeds, run STEPS
LoRA training steps on a (data=2, expert=2, tensor=2) mesh, and each writes the losses it read
to OUT_PREFIX.PROCESS_ID.json.
"""

import json
import os
import sys

# The test suite's compile settings (tests/conftest.py), with 4 devices per process.
os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main():
    pid, nproc, port, out, steps = sys.argv[1:6]
    from k2jax.sharding import initialize_distributed

    initialize_distributed(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=int(nproc),
        process_id=int(pid),
        initialization_timeout=120,
    )
    assert jax.device_count() == 4 * int(nproc), jax.devices()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from multihost.run import run_steps

    losses = run_steps(int(steps), mesh_shape=(2, 2, 2))
    result = {
        "losses": losses,
        "process_index": jax.process_index(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
    }
    with open(f"{out}.{pid}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
