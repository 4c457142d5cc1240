"""Issue 7's GPU benchmark in one command: prints one table, writes benchmarks/results/latest.json.

    PYTHONUNBUFFERED=1 python3 benchmarks/run_all.py --out $OUT/latest.json   # device machine
    .venv/bin/python benchmarks/run_all.py --tiny --out /tmp/bench_tiny.json  # CPU smoke test

(RESULTS.md gives the device machine's whole command line and timeout.) Parts, `--parts` picks:

  a  grouped matmul (the Pallas kernel, bf16 and INT4, and the padded-einsum baseline) forward and
     input-gradient TFLOP/s at K2 expert shapes: bench_gmm.py's cases, 384 experts × 32k routed
     rows and 48 experts × 262k rows, gate|up 7168→4096 and down 2048→7168
  b  a whole LoRA train step of the Kimi-K2-dimension slice (1 dense + 3 MoE layers, 384 INT4
     experts, seq 4096, LoRA r=16 everywhere, MuonClip, remat full): bench_step.py --case b
  c  the projected full-model tokens/s on one 8×H200 node, an estimate: bench_step.py --case c
     (1 dense + 1 MoE layer, for the per-layer split) and bench_step.project_8xh200 on (b), (c)
     and, when present, (a)'s rates
  d  the same run, side by side: k2jax on hf_peft_baseline.py's slice (bench_step.py --case d:
     96 bf16 experts) and hf_peft_baseline.py itself, if torch, transformers and peft import here
     (else recorded as skipped)

They run in the order b, c, d, a, so that a run cut short loses the least important part, and the
JSON is rewritten after every part (a killed run keeps what finished). Each measurement is its own
child process: a failure (an out-of-memory, a crash, a time-out) becomes that part's error string
and the rest still runs, and each process's peak-memory reading is its own. (Rejected: one process
for everything — jax cannot reset its peak-memory statistic, and a jax process keeps the GPU
memory it has allocated, which the HF+PEFT process needs.) This process only asks jax which
device it is, with preallocation off, so it holds no GPU memory.

latest.json: tokens_per_s and mfu of (b); projected_8xh200_tokens_per_s of (c) (useful all-to-all
volume, no overlap: the conservative figure; the rest is under parts.c); vs_hf_peft_ratio of (d)
(k2jax tokens/s ÷ HF+PEFT tokens/s, both measured in this run); device, jax_version, date; then
every part's full record or its {"error": ...} / {"skipped": ...}. A key whose part did not
produce it is null: nothing is filled in. The default output path is used only for a full-size
run on a GPU; a CPU or --tiny run must name --out.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
DEFAULT_OUT = BENCH / "results" / "latest.json"
ORDER = ("b", "c", "d", "a")
TARGETS = {"mfu": 0.40, "projected_8xh200_tokens_per_s": 13_200, "vs_hf_peft_ratio": 2.0}
HF_MEASURED = "12.8k tokens/s, 22.6% MFU, 72.9 GB (GPU_NOTES.md, H100)"
# Seconds per child (capped by what is left of --budget-s); the device machine's one call allows
# 10 minutes in all, the machine's start not included.
TIMEOUT_S = {"b": 300, "c": 200, "d": 200, "hf": 200, "a": 200}
MIN_START_S = 45  # a part is skipped rather than started with less time than this left


def _child_env(tiny: bool, compile_cache: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if tiny:  # the CPU smoke test: compile time dominates, as in the test suite (conftest.py)
        flags = env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
        env["XLA_FLAGS"] = flags.strip()
        return env
    # Each child is alone on the GPU: let jax take 90% of it (default 75%: 60 GB of an 80 GB H100,
    # less than slice (b)'s random init may need on top of its 35 GB base).
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    if compile_cache:
        # jax's persistent cache also turns on XLA's per-fusion autotuning cache: (c) and (d)
        # reuse the autotuning (b) did for the same layer shapes.
        env.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/k2jax_bench_jax_cache")
    return env


class Runner:
    def __init__(self, args, env: dict, work: Path):
        self.args, self.env, self.work = args, env, work
        self.deadline = time.monotonic() + args.budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def child(self, label: str, cmd: list[str], out: Path, timeout: float) -> dict:
        """Runs cmd (which writes `out`), streaming its output; its JSON record or an error."""
        left = self.left()
        if left < MIN_START_S:
            return {"skipped": f"out of time: {left:.0f} s of --budget-s left"}
        timeout = min(timeout, left)
        tail: collections.deque[str] = collections.deque(maxlen=30)
        t0 = time.monotonic()
        print(f"[{label}] $ {' '.join(cmd[1:])}  (timeout {timeout:.0f} s)", flush=True)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, cwd=ROOT
        )
        killed = threading.Event()

        def kill():
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in proc.stdout:
                print(f"[{label}] {line}", end="", flush=True)
                tail.append(line.rstrip())
            rc = proc.wait()
        finally:
            timer.cancel()
        wall = time.monotonic() - t0
        record = None
        if out.exists():
            try:
                record = json.loads(out.read_text())
            except json.JSONDecodeError:
                record = None
        if killed.is_set():
            return {"error": f"timed out after {timeout:.0f} s", "log_tail": list(tail)}
        if record is None:
            last = next((line for line in reversed(tail) if line.strip()), "")
            error = f"exit status {rc}, no result written: {last}"
            return {"error": error, "log_tail": list(tail)}
        if rc != 0 or "error" in record:
            record.setdefault("error", f"exit status {rc}")
            record["log_tail"] = list(tail)
        record["child_wall_s"] = wall
        return record

    def step_case(self, case: str) -> dict:
        out = self.work / f"{case}.json"
        cmd = [sys.executable, str(BENCH / "bench_step.py"), "--case", case, "--out", str(out)]
        cmd += ["--steps", str(self.args.steps), "--warmup", str(self.args.warmup)]
        cmd += ["--peak-tflops", str(self.args.peak_tflops)]
        if self.args.tiny:
            cmd.append("--tiny")
        return self.child(case, cmd, out, TIMEOUT_S[case])

    def hf(self) -> dict:
        missing = [
            m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None
        ]
        if missing:
            return {"skipped": f"not importable here: {', '.join(missing)}"}
        out = self.work / "hf.json"
        cmd = [sys.executable, str(BENCH / "hf_peft_baseline.py"), "--out", str(out)]
        cmd += ["--steps", str(self.args.steps), "--warmup", str(self.args.warmup)]
        cmd += ["--peak-tflops", str(self.args.peak_tflops)]
        if self.args.tiny:
            cmd += ["--tiny", "--seq", "256", "--experts", "4"]
        return self.child("d/hf", cmd, out, TIMEOUT_S["hf"])

    def gmm(self) -> dict:
        out = self.work / "a.json"
        cmd = [sys.executable, str(BENCH / "bench_gmm.py"), str(out)]
        cmd += ["--iters", str(self.args.gmm_iters), "--warmup", "1"]
        if self.args.tiny:  # tiny shapes; the Pallas kernel runs in interpret mode on a CPU
            cmd += ["--shape", "8,512,256,128", "--shape", "8,512,128,256"]
        return self.child("a", cmd, out, TIMEOUT_S["a"])


def _projection(results: dict) -> dict:
    parts = results["parts"]
    b, c = parts.get("b", {}), parts.get("c", {}).get("slice", {})
    for name, r in (("b", b), ("c", c)):
        if "step_s" not in r:
            why = r.get("error") or r.get("skipped") or "not run"
            return {"error": f"needs part {name}'s step time ({why})"}
    import bench_step  # jax and k2jax load here; no device is touched

    full = bench_step.load_model_config("tiny.gin" if b["tiny"] else "kimi_k2_thinking.gin")
    gmm_rows = parts.get("a", {}).get("rows")
    return bench_step.project_8xh200(
        b, c, full, nvlink_gb_s=results["nvlink_gb_s"], gmm_rows=gmm_rows
    )


def _fmt(x, width: int, spec: str, scale: float = 1.0) -> str:
    return f"{'—':>{width}}" if x is None else format(x * scale, f"{width}{spec}")


def _sub(parts: dict, part: str, key: str) -> dict:
    """parts[part][key], or the part's own error when it failed as a whole."""
    r = parts.get(part, {})
    return r.get(key) or {k: r[k] for k in ("error", "skipped") if k in r}


def print_table(results: dict) -> None:
    parts = results["parts"]
    tiny = " (TINY PRESET: a smoke test, not a measurement)" if results["tiny"] else ""
    print(
        f"\nk2jax benchmark — {results['device']}, jax {results['jax_version']}, "
        f"{results['date']}{tiny}"
    )
    head = f"{'part':<6}{'what':<46}{'tok/s':>9}{'step ms':>9}{'GF/tok':>8}{'MFU':>7}{'peak GB':>9}"
    print(head)
    print("-" * len(head))
    rows = [
        ("(b)", parts.get("b", {})),
        ("(c)", _sub(parts, "c", "slice")),
        ("(d)", _sub(parts, "d", "k2jax")),
        ("(d)", _sub(parts, "d", "hf_peft")),
    ]
    for label, r in rows:
        what = r.get("what") or (
            f"HF+PEFT: {r.get('layers')}, {r.get('experts')} bf16 experts"
            if r.get("system")
            else ""
        )
        if "tokens_per_s" not in r:
            msg = r.get("error") or r.get("skipped") or "not run"
            print(f"{label:<6}{what[:45]:<46}{msg}")
            continue
        print(
            f"{label:<6}{what[:45]:<46}{r['tokens_per_s']:>9.0f}{_fmt(r.get('step_s'), 9, '.1f', 1e3)}"
            f"{_fmt(r.get('flops_per_token'), 8, '.2f', 1e-9)}{_fmt(r.get('mfu'), 7, '.1%')}"
            f"{_fmt(r.get('peak_memory_gb'), 9, '.1f')}"
        )
    d = parts.get("d", {})
    if d.get("hf_mfu_library_flops") is not None:
        print(f"{'':<6}HF+PEFT MFU with k2jax's FLOP count: {d['hf_mfu_library_flops']:.1%}")
    a = parts.get("a", {})
    print("\n(a) grouped matmul, TFLOP/s of useful 2·M·K·N")
    if "rows" in a:
        print(f"      {'case':<18}{'impl':<13}{'fwd ms':>9}{'TF/s':>7}{'dx ms':>9}{'TF/s':>7}")
        for r in a["rows"]:
            print(
                f"      {r['case']:<18}{r['impl']:<13}{r['fwd_ms']:>9.3f}{r['fwd_tflops']:>7.0f}"
                f"{r['dx_ms']:>9.3f}{r['dx_tflops']:>7.0f}"
            )
    else:
        print(f"      {a.get('error') or a.get('skipped') or 'not run'}")
    p = _sub(parts, "c", "projection")
    print("\n(c) full Kimi-K2 on 8×H200, expert=8 — an ESTIMATE (bench_step.project_8xh200)")
    if "tokens_per_s_no_overlap" in p:
        print(
            f"      per MoE layer {p['t_moe_layer_s'] * 1e3:.1f} ms, fixed {p['t_fixed_s'] * 1e3:.1f}"
            f" ms, compute/step {p['t_compute_s']:.3f} s, all-to-all/step {p['a2a_s_per_step']:.3f}"
            f" s at {p['nvlink_gb_s_per_direction']:.0f} GB/s"
        )
        print(
            f"      tokens/s: {p['tokens_per_s_no_overlap']:,.0f} no overlap, "
            f"{p['tokens_per_s_full_overlap']:,.0f} full overlap, "
            f"{p['tokens_per_s_padded_a2a_no_overlap']:,.0f} with today's padded all_to_all"
        )
        if "tokens_per_s_no_overlap_e48_gemm_rate" in p:
            print(
                f"      at (a)'s E48 GEMM rate: {p['tokens_per_s_no_overlap_e48_gemm_rate']:,.0f}"
                f" no overlap, {p['tokens_per_s_full_overlap_e48_gemm_rate']:,.0f} full overlap"
            )
    else:
        print(f"      {p.get('error') or 'not run'}")
    print("\nheadline (target):")
    for key in ("tokens_per_s", "mfu", "projected_8xh200_tokens_per_s", "vs_hf_peft_ratio"):
        v, t = results[key], TARGETS.get(key)
        shown = "null" if v is None else f"{v:.1%}" if key == "mfu" else f"{v:,.2f}"
        goal = "" if t is None else f"  (≥ {t:.0%})" if key == "mfu" else f"  (≥ {t:,})"
        print(f"      {key:<32}{shown}{goal}")
    print(f"      HF+PEFT on (d)'s slice measured before: {HF_MEASURED}")


def _write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, default=None, help=f"JSON to write (GPU default {DEFAULT_OUT})"
    )
    p.add_argument("--parts", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    p.add_argument("--tiny", action="store_true", help="tiny preset and op shapes (CPU smoke test)")
    p.add_argument("--steps", type=int, default=None, help="timed train steps (default 5; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; tiny 1)")
    p.add_argument(
        "--gmm-iters", type=int, default=None, help="(a) timed calls (default 5; tiny 2)"
    )
    p.add_argument("--peak-tflops", type=float, default=800.0, help="MFU denominator per GPU")
    p.add_argument("--nvlink-gb-s", type=float, default=450.0, help="(c) per direction per GPU")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting parts after this")
    p.add_argument("--no-compile-cache", action="store_true", help="no jax/XLA autotune cache")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if unknown := set(parts) - set(ORDER):
        p.error(f"--parts: unknown {sorted(unknown)}; parts are a, b, c, d")
    args.steps = args.steps or (2 if args.tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.gmm_iters = args.gmm_iters or (2 if args.tiny else 5)
    args.budget_s = args.budget_s or (300.0 if args.tiny else 480.0)

    env = _child_env(args.tiny, not args.no_compile_cache)  # before this process touches jax
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax

    device = jax.devices()[0]
    backend = device.platform
    if args.out is None:
        if backend != "gpu" or args.tiny:
            p.error(
                f"--out is required on a {backend} backend or with --tiny ({DEFAULT_OUT} "
                "holds full-size GPU measurements only)"
            )
        args.out = DEFAULT_OUT
    elif args.out.resolve() == DEFAULT_OUT.resolve() and (backend != "gpu" or args.tiny):
        p.error(f"{DEFAULT_OUT} holds full-size GPU measurements only; choose another --out")

    t_start = time.monotonic()
    results = {
        "tokens_per_s": None,
        "mfu": None,
        "projected_8xh200_tokens_per_s": None,
        "vs_hf_peft_ratio": None,
        "device": device.device_kind,
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tiny": args.tiny,
        "backend": backend,
        "peak_tflops": args.peak_tflops,
        "nvlink_gb_s": args.nvlink_gb_s,
        "git_commit": _git_commit(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "targets": TARGETS,
        "parts": {},
    }
    with tempfile.TemporaryDirectory(prefix="k2jax_bench_") as work:
        run = Runner(args, env, Path(work))
        for part in ORDER:
            if part not in parts:
                continue
            try:
                if part == "b":
                    results["parts"]["b"] = r = run.step_case("b")
                    results["tokens_per_s"] = r.get("tokens_per_s")
                    results["mfu"] = r.get("mfu")
                elif part == "c":
                    results["parts"]["c"] = {"slice": run.step_case("c")}
                elif part == "d":
                    results["parts"]["d"] = d = {"k2jax": run.step_case("d")}
                    d["hf_peft"] = run.hf()
                    k, h = d["k2jax"].get("tokens_per_s"), d["hf_peft"].get("tokens_per_s")
                    if k and h:
                        d["ratio"] = results["vs_hf_peft_ratio"] = k / h
                        fpt = d["k2jax"]["flops_per_token"]
                        d["hf_mfu_library_flops"] = h * fpt / (args.peak_tflops * 1e12)
                elif part == "a":
                    results["parts"]["a"] = run.gmm()
            except Exception as e:  # a bug here must not lose the parts already measured
                results["parts"][part] = {"error": f"{type(e).__name__}: {e}"}
            if "c" in results["parts"]:
                try:
                    proj = results["parts"]["c"]["projection"] = _projection(results)
                except Exception as e:
                    proj = results["parts"]["c"]["projection"] = {
                        "error": f"{type(e).__name__}: {e}"
                    }
                results["projected_8xh200_tokens_per_s"] = proj.get("tokens_per_s_no_overlap")
            results["wall_s"] = time.monotonic() - t_start
            _write(args.out, results)
    print_table(results)
    print(f"\nwrote {args.out} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
