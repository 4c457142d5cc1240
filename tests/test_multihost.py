"""Multi-host: two processes on localhost, joined by jax.distributed (4 CPU devices each, gloo
collectives), train on one 8-device (data=2, expert=2, tensor=2) mesh and reproduce the losses of
the same run in this single process on its 8 simulated devices.

The two processes are tests/multihost/worker.py; both sides run tests/multihost/run.py, which feeds
each process only the batch rows its devices hold, as a real multi-host run does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import time

from helpers import ROOT, python_exe, rel_err
from multihost.run import run_steps

WORKER = ROOT / "tests" / "multihost" / "worker.py"
STEPS = 3
MESH = (2, 2, 2)
TIMEOUT_S = 300  # both workers together; they normally take well under a minute


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path, n=6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no output)"


@contextlib.contextmanager
def _workers(tmp_path, n=2):
    """Starts the n worker processes; `wait()` of the yielded object collects their results. On
    leaving — normally, on a failure, or after the timeout — no worker is left running."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env["JAX_PLATFORMS"] = "cpu"  # worker.py sets its own XLA_FLAGS (4 devices)
    logs = [tmp_path / f"worker{i}.log" for i in range(n)]
    procs = []

    def wait() -> list[dict]:
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                break  # one failed: the others would wait for it forever
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        report = "\n".join(
            f"--- worker {i} (exit {p.returncode}) ---\n{_tail(logs[i])}"
            for i, p in enumerate(procs)
        )
        assert all(p.returncode == 0 for p in procs), (
            f"workers failed or ran past {TIMEOUT_S} s:\n{report}"
        )
        return [json.loads((tmp_path / f"out.{i}.json").read_text()) for i in range(n)]

    try:
        for i in range(n):
            cmd = [str(WORKER), str(i), str(n), str(port), str(tmp_path / "out"), str(STEPS)]
            with logs[i].open("w") as log:
                procs.append(
                    subprocess.Popen(
                        [python_exe(), *cmd],
                        cwd=ROOT,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield wait
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_processes_reproduce_the_single_process_losses(tmp_path):
    with _workers(tmp_path) as wait:
        single = run_steps(STEPS, MESH)  # meanwhile, the same run in this process
        results = wait()
    for i, r in enumerate(results):
        assert (r["process_index"], r["devices"], r["local_devices"]) == (i, 8, 4), r
    multi = results[0]["losses"]
    assert results[1]["losses"] == multi  # the loss is replicated: both processes read the same

    assert len(single) == len(multi) == STEPS
    assert all(math.isfinite(x) for x in single), single
    assert len(set(single)) == STEPS, single  # the adapters trained: a real comparison
    assert rel_err(multi, single) <= 1e-5, (multi, single)
