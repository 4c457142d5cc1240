"""The Pallas grouped matmul's memory offsets at full Kimi-K2 sizes, checked on the Triton IR.

Pallas' Triton lowering computes the element offset of every load and store in i32 unless the
operand is larger than 2**32 bytes, and Triton's `tt.addptr` becomes an LLVM GEP, which
sign-extends an i32 offset: an offset ≥ 2**31 elements reads or writes the wrong memory
(k2jax/ops/gmm_pallas.py, "32-bit offsets and stacks above 2 GiB"). The 384-expert INT4 down stack
(2.82 GB, addressed as bytes) is such an operand.

The tests lower the forward pass and all gradients at K2 sizes for an abstract H100 (nothing is
allocated, nothing runs), capture every kernel's Triton IR and check each `tt.addptr`: an i64
offset is safe; an i32 offset is safe if its operand has ≤ 2**31 elements (every in-bounds offset
is then < 2**31; the masks that keep accesses in bounds are checked numerically in
tests/test_gmm_pallas.py) or if an interval analysis of the IR alone bounds it below 2**31. The
analysis knows the program-id range and loop bounds; values loaded from memory are unbounded.

The same IR shows the INT4 dequantisation's loads: one small scale tile per weight tile, and no
int→float conversion.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.triton import lowering as triton_lowering

from k2jax.ops.gmm_pallas import grouped_matmul_pallas
from k2jax.ops.grouped_matmul import GroupedLora
from k2jax.quant import Int4Weight

I32_LIMIT = 2**31
POINTEE_BYTES = {"i1": 1, "i8": 1, "i16": 2, "bf16": 2, "f16": 2, "i32": 4, "f32": 4, "i64": 8}

# (experts E, routed rows M, K, N, weights, LoRA rank, column blocks, LoRA input): one adapter
# (blocks 1) or one per column block (gate and up: blocks 2, rank r each); its input x ("x"), one
# separate array for all adapters ("one"), or one per block ("each").
CASES = {
    # K2 down on one GPU: 384 × 7168 × 2048 int4 = 2.82 GB, between 2**31 and 2**32 bytes.
    "int4-down-E384": (384, 32768, 2048, 7168, "int4", 16, 1, "x"),
    # K2 gate|up on one GPU: 5.6 GB, so the lowering uses i64 offsets.
    "int4-gate_up-E384": (384, 32768, 7168, 4096, "int4", 32, 1, "one"),
    # gate|up under 2-way expert parallelism: 2.82 GB again.
    "int4-gate_up-E192": (192, 65536, 7168, 4096, "int4", 32, 1, "x"),
    # bf16 experts with 262k sorted rows on one GPU: x and dx are 3.8 GB of bf16 (i32 offsets,
    # < 2**31 elements), the weights 22.5 GB (i64).
    "bf16-gate_up-E384-M262k": (384, 262144, 7168, 4096, "bf16", 32, 1, "one"),
    # The experts' form: gate and up adapters (rank 16) as two column blocks of gate|up, each on
    # its own dropped-out input; and both on x, where dx fuses both adapters.
    "int4-gate_up-E384-blocks": (384, 32768, 7168, 4096, "int4", 16, 2, "each"),
    "int4-gate_up-E192-blocks": (192, 65536, 7168, 4096, "int4", 16, 2, "x"),
}


def _kernel_names(blocks: int, lora_x: str) -> list[str]:
    """The kernels of the forward and backward pass, by name (gmm_pallas.py, "Backward")."""
    if blocks == 1:
        return ["gmm", "gmm_dt", "gmm_dx", "gmm_lora_a", "tgmm_da", "tgmm_db"] + (
            [] if lora_x == "x" else ["gmm_dlora_x"]
        )
    per_block = ["gmm_lora_a", "gmm_dt", "tgmm_da", "tgmm_db"]
    names = ["gmm", "gmm_dx"] + [f"{n}_block{b}" for n in per_block for b in range(blocks)]
    # One d lora_x kernel per distinct input, named by the first block that reads it.
    dlora_x = {"x": [], "one": [0], "each": range(blocks)}[lora_x]
    return names + [f"gmm_dlora_x_block{b}" for b in dlora_x]


def _lower_k2(monkeypatch, E, M, K, N, weights, r, blocks, lora_x):
    """Lowers y and the cotangents of (x, lora, lora_x) for cuda; returns the captured kernels
    as (name, grid, operand avals, Triton IR text)."""
    kernels = []
    real = triton_lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, grid_mapping, *args, **kwargs):
        result = real(jaxpr, grid_mapping, *args, **kwargs)
        avals = [bm.array_aval for bm in grid_mapping.block_mappings]
        text = result.module.operation.get_asm()
        kernels.append((jaxpr.debug_info.func_name, tuple(result.grid), avals, text))
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", capture)
    S = jax.ShapeDtypeStruct
    x, dy, gs = S((M, K), jnp.bfloat16), S((M, N), jnp.bfloat16), S((E,), jnp.int32)
    if weights == "int4":
        w = Int4Weight(S((E, N, K), jnp.int4), S((E, N, K // 32), jnp.bfloat16))
    else:
        w = S((E, N, K), jnp.bfloat16)
    lora = tuple(
        GroupedLora(S((E, r, K), jnp.float32), S((E, N // blocks, r), jnp.float32), 2.0)
        for _ in range(blocks)
    )
    lx = {
        "x": None,
        "one": S((M, K), jnp.bfloat16),
        "each": tuple(S((M, K), jnp.bfloat16) for _ in range(blocks)),
    }[lora_x]
    if blocks == 1:  # today's form: one GroupedLora
        (lora,) = lora

    def f(x, w, gs, lora, lx, dy):
        def fn(x, lora, lx):
            return grouped_matmul_pallas(x, w, gs, lora=lora, lora_x=lx, interpret=False)

        y, vjp = jax.vjp(fn, x, lora, lx)
        return y, vjp(dy)

    h100 = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda"
    )
    with jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
    ):
        jax.jit(f).trace(x, w, gs, lora, lx, dy).lower(lowering_platforms=("cuda",))
    return kernels


# --------------------------------------------------------------------------------------------
# A small reader of Triton IR text: pointer provenance, offset widths, integer intervals
# --------------------------------------------------------------------------------------------

_DEF = re.compile(r"^\s*(%[\w$.-]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_FOR = re.compile(r"scf\.for (%[\w$.-]+) = (%[\w$.-]+) to (%[\w$.-]+) step (%[\w$.-]+)")
_ARG = re.compile(r"(%arg\d+): !tt\.ptr<(\w+)>")
_SSA = re.compile(r"%[\w$.-]+(?:#\d+)?")


def _element_type(type_text: str) -> str:
    """'tensor<128x32xi32>' → 'i32'; 'i32' → 'i32'; pointer tensors → 'ptr'."""
    type_text = type_text.strip()
    if "!tt.ptr" in type_text:
        return "ptr"
    m = re.search(r"(?:x|<|^)(i\d+|bf16|f\d+)>?$", type_text)
    return m.group(1) if m else "?"


def _shape_size(type_text: str) -> int:
    m = re.match(r"tensor<((?:\d+x)+)", type_text.strip())
    return math.prod(int(d) for d in m.group(1).rstrip("x").split("x")) if m else 1


def _type_range(type_name):
    """The values of a signless integer type read as signed (i1: 0 or 1); None if not one."""
    if not re.fullmatch(r"i\d+", type_name):
        return None
    bits = int(type_name[1:])
    return (0, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _fits(iv, type_name):
    """iv if it fits the result type, i.e. the IR computed it without wrapping; else None."""
    full = _type_range(type_name)
    if iv is None or full is None:
        return None
    return iv if full[0] <= iv[0] and iv[1] <= full[1] else None


def _binary(op, a, b):
    if a is None or b is None:
        return None
    (al, ah), (bl, bh) = a, b
    if op == "arith.addi":
        return al + bl, ah + bh
    if op == "arith.subi":
        return al - bh, ah - bl
    if op == "arith.muli":
        products = (al * bl, al * bh, ah * bl, ah * bh)
        return min(products), max(products)
    if op == "arith.minsi":
        return min(al, bl), min(ah, bh)
    if op == "arith.maxsi":
        return max(al, bl), max(ah, bh)
    if al < 0 or bl < 0:
        return None  # the rest only for non-negative operands (unsigned = signed there)
    if op == "arith.minui":
        return min(al, bl), min(ah, bh)
    if op == "arith.maxui":
        return max(al, bl), max(ah, bh)
    if op in ("arith.divsi", "arith.divui"):
        return (al // bh, ah // bl) if bl > 0 else None
    if op in ("arith.remsi", "arith.remui"):
        return (0, min(ah, bh - 1)) if bl > 0 else None
    if op == "arith.andi":
        return 0, min(ah, bh)
    if op in ("arith.shrui", "arith.shrsi"):
        return al >> bh, ah >> bl
    return None


_PASS = {"tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans", "arith.extsi"}
_PASS |= {"arith.trunci", "arith.index_cast"}
_BINARY = {"arith.addi", "arith.subi", "arith.muli", "arith.minsi", "arith.minui", "arith.maxsi"}
_BINARY |= {"arith.maxui", "arith.divsi", "arith.divui", "arith.remsi", "arith.remui"}
_BINARY |= {"arith.andi", "arith.shrui", "arith.shrsi"}


def analyse(text: str, grid: tuple[int, ...]):
    """(pointee type per pointer argument, accesses, intervals).

    accesses: (op, argument index, offset width, offset interval, elements, SSA name) for every
    `tt.addptr` and `tt.load`. An interval is the range of an integer value *as computed*
    without wrap-around (a loaded value: its type's range); None where an operation could have
    wrapped or is not understood. So an i32 offset with an interval is its true offset.
    """
    pointee = {int(name[4:]): t for name, t in _ARG.findall(text.split("\n", 2)[1])}
    ranges: dict[str, tuple[int, int] | None] = {}
    root: dict[str, int] = {f"%arg{i}": i for i in pointee}
    accesses = []
    for line in text.splitlines():
        loop = _FOR.search(line)
        if loop:
            iv, lb, ub, step = loop.groups()
            lbr, ubr, stepr = ranges.get(lb), ranges.get(ub), ranges.get(step)
            ok = lbr is not None and ubr is not None and stepr is not None and stepr[0] >= 1
            ranges[iv] = (lbr[0], ubr[1] - 1) if ok else None
        m = _DEF.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        head = re.split(r" \{| : ", rest, maxsplit=1)[0]
        operands = _SSA.findall(head)
        types = rest.rsplit(" : ", 1)[-1]
        result_type = _element_type(re.split(r"->| to ", types)[-1].split(",")[0])
        iv = None
        if op == "arith.constant":
            v = re.match(r"(?:dense<)?(-?\d+|true|false)\b(?!\.)", rest)
            if v and result_type.startswith("i"):
                iv = {"true": (1, 1), "false": (0, 0)}.get(v.group(1))
                iv = iv or (int(v.group(1)), int(v.group(1)))
        elif op == "tt.make_range":
            r = re.search(r"end = (\d+) : i32, start = (\d+) : i32", rest)
            iv = (int(r.group(2)), int(r.group(1)) - 1)
        elif op == "tt.get_program_id":
            axis = "xyz".index(rest.split()[0])
            iv = (0, (grid[axis] if axis < len(grid) else 1) - 1)
        elif op in _PASS and operands:
            iv = ranges.get(operands[0])
        elif op == "arith.extui" and operands:
            src = ranges.get(operands[0])
            iv = src if src is not None and src[0] >= 0 else None
        elif op in _BINARY and len(operands) == 2:
            iv = _binary(op, ranges.get(operands[0]), ranges.get(operands[1]))
        elif op == "tt.load":  # any value of the pointee type, but no wrap
            result_type = re.search(r"!tt\.ptr<(\w+)>", types).group(1)
            iv = _type_range(result_type)
        elif op == "arith.cmpi":
            iv = (0, 1)
        elif op == "arith.select" and len(operands) == 3:
            a, b = ranges.get(operands[1]), ranges.get(operands[2])
            iv = None if a is None or b is None else (min(a[0], b[0]), max(a[1], b[1]))
        ranges[name] = _fits(iv, result_type)
        if op in ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape") and operands:
            if operands[0] in root:
                root[name] = root[operands[0]]
        elif op == "tt.addptr":
            ptr, offset = operands
            # Pallas adds one offset to the argument's (splatted) base pointer; a chain of
            # addptrs would need its offsets summed, which this reader does not do.
            assert ptr not in {a[5] for a in accesses if a[0] == "tt.addptr"}, line
            root[name] = root[ptr]
            width = int(_element_type(types.rsplit(",", 1)[-1])[1:])
            accesses.append(("tt.addptr", root[ptr], width, ranges[offset], None, name))
        elif op == "tt.load":
            size = _shape_size(types.split("->")[0].split(",")[0])
            accesses.append(("tt.load", root[operands[0]], None, None, size, name))
    return pointee, accesses, ranges


def _operand_bytes(aval) -> int:
    if jnp.dtype(aval.dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)):
        return math.ceil(aval.size / 2)  # int4 codes are addressed as packed bytes
    return aval.size * jnp.dtype(aval.dtype).itemsize


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("case", list(CASES))
def test_offsets_fit_at_k2_sizes(monkeypatch, case):
    kernels = _lower_k2(monkeypatch, *CASES[case])
    names = sorted(k[0] for k in kernels)
    assert names == sorted(_kernel_names(*CASES[case][6:])), names
    proved_by_interval = 0
    for name, grid, avals, text in kernels:
        pointee, accesses, _ = analyse(text, grid)
        assert sorted(pointee) == list(range(len(avals))), (name, pointee, avals)
        for op, arg, width, interval, _, ssa in accesses:
            if op != "tt.addptr":
                continue
            nbytes = _operand_bytes(avals[arg])
            # The lowering's rule, as the module docstring states it: i64 iff > 2**32 bytes.
            assert width == (64 if nbytes > 2**32 else 32), (name, arg, avals[arg], width)
            elements = nbytes // POINTEE_BYTES[pointee[arg]]
            where = f"{case} {name} operand {arg} {avals[arg]} ({ssa}: i{width} offsets)"
            if width == 64 or elements <= I32_LIMIT:
                continue
            assert interval is not None, f"{where}: {elements} elements, offsets may wrap"
            assert interval[0] >= 0, f"{where}: offsets down to {interval[0]}"
            proved_by_interval += 1
    if case in ("int4-down-E384", "int4-gate_up-E192", "int4-gate_up-E192-blocks"):
        # The stacks between 2**31 and 2**32 bytes really are read with i32 offsets, and the
        # analysis bounds them (forward and dx): the check above is not vacuous.
        assert proved_by_interval >= 2


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_int4_tile_loads(monkeypatch):
    """Per weight tile, the INT4 kernels load one [rows, cols / 32] scale tile (not a scale per
    weight element) and convert the codes without an int→float instruction."""
    E, M, K, N = 384, 32768, 2048, 7168
    kernels = _lower_k2(monkeypatch, E, M, K, N, "int4", 16, 1, "x")
    seen = set()
    for name, grid, avals, text in kernels:
        _, accesses, _ = analyse(text, grid)
        scale_args = [i for i, a in enumerate(avals) if a.shape == (E, N, K // 32)]
        if not scale_args:
            continue
        seen.add(name)
        loads = [a[4] for a in accesses if a[0] == "tt.load" and a[1] in scale_args]
        # 128×128×64 tiles: forward tile [bn, bk] = [128, 64] → [128, 2]; dx [bk, bn] → [64, 4].
        assert loads and max(loads) == 128 * 64 // 32, (name, loads)
        # (x's masked loads convert their i32 `other=0` constant; the codes are i4/i8/i16.)
        assert not re.search(r"arith\.[su]itofp %\S+ : tensor<[\dx]+x(i4|i8|i16)>", text), name
    assert seen == {"gmm", "gmm_dx"}
