"""Read a compiled kernel: resources from the cubin, and per-region SASS instruction counts.

Method (what ``instr_per_elem`` counts). ``nvdisasm`` lists the kernel's SASS in address order with
its branch labels. A backward branch closes a loop. A loop is a *data loop* when it holds a global
load or store of kernel data (``LDG`` other than ``LDG.E.CONSTANT``, or ``STG``); the outermost data
loop is the steady-state tile loop, and a data loop nested in it (the n_samples loop) runs
``inner_trips`` times per tile. A loop without data access (libdevice's Payne-Hanek reduction of
``cos`` for |x| > ~1e5, which walks a constant table) is cold, together with the branch region that
guards it: typical data never take it. Code after the kernel's final ``EXIT`` (out-of-line slow
paths, e.g. IEEE division's special cases) is cold too. Everything else is counted once per program
(outside the tile loop) or once per tile iteration (inside), predicated instructions included (they
issue whether or not their predicate holds).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from functools import cache

_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_TARGET = re.compile(r"`\((\.L\w+)\)")
_INT_OPS = {
    "IADD3", "IADD", "IMAD", "IMUL", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "ICMP", "LEA", "IABS", "IMNMX",
    "VIMNMX", "SEL", "PRMT", "POPC", "FLO", "BREV", "BMSK", "VIADD", "IDP", "I2I", "IADD32I", "UIADD3", "UIMAD",
    "ULOP3", "USHF", "ULEA", "UISETP", "USEL", "UPRMT", "UIMNMX", "UFLO", "UPOPC", "UBREV", "UBMSK",
}


@cache
def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the Triton wheel ({path})")
    return path


def _with_cubin(cubin: bytes, args: list[str]) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([args[0], *args[1:], f.name], check=True, capture_output=True, text=True).stdout


def resources(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` of the kernel from ``cuobjdump -res-usage``."""
    out = _with_cubin(cubin, [_tool("cuobjdump"), "-res-usage"])
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out.split("Function", 1)[-1]))
    return {k: int(v) for k, v in found.items()}


def disassemble(cubin: bytes) -> str:
    return _with_cubin(cubin, [_tool("nvdisasm"), "-c"])


def _width(opcode: str) -> int:
    for part in opcode.split(".")[1:]:
        if part in ("64", "128"):
            return int(part)
        if part in ("U16", "S16"):
            return 16
        if part in ("U8", "S8"):
            return 8
    return 32


def _is_data(opcode: str) -> bool:
    return opcode.startswith("STG") or (opcode.startswith("LDG") and ".CONSTANT" not in opcode)


def regions(sass: str) -> dict:
    """Instruction counts per region: ``outside`` the tile loop, ``loop`` (per tile), ``inner`` (per inner trip).

    Each region maps to ``{"total", "int", "mufu", "load_bits", "store_bits"}``; ``cold`` counts what was left out.
    """
    instrs, labels = [], {}
    for line in sass.splitlines():
        if m := _LABEL.match(line):
            labels[m.group(1)] = len(instrs)
        elif m := _INSTR.match(line):
            instrs.append((m.group(3), m.group(2) is not None, m.group(4)))
    end = len(instrs)
    for i, (op, predicated, text) in enumerate(instrs):  # the trap loop after the last EXIT ends the kernel
        if op == "BRA" and not predicated and labels.get(_target(text)) == i:
            end = i
            break
    loops = []
    branches = []
    for i, (op, predicated, text) in enumerate(instrs[:end]):
        if op.startswith("BRA") and (t := labels.get(_target(text))) is not None:
            if t <= i:
                loops.append((t, i))
            elif predicated:
                branches.append((i, t))
    data = [(a, b) for a, b in loops if any(_is_data(op) for op, _, _ in instrs[a:b + 1])]
    cold = [False] * end
    for a, b in loops:
        if (a, b) in data:
            continue
        guard = [(i, t) for i, t in branches if i < a and t > b]
        if guard:  # the nearest enclosing branch region, from its first branch
            hi = min(t for _, t in guard)
            lo = min(i for i, t in guard if t == hi) + 1
        else:
            lo, hi = a, b + 1
        for i in range(lo, min(hi, end)):
            cold[i] = True
    outer = max(data, key=lambda ab: ab[1] - ab[0], default=None)
    inner = [(a, b) for a, b in data if outer and (a, b) != outer and outer[0] <= a and b <= outer[1]]
    counts = {name: Counter() for name in ("outside", "loop", "inner", "cold")}
    bits = {name: {"load": set(), "store": set()} for name in ("outside", "loop", "inner")}
    for i, (op, _, _) in enumerate(instrs[:end]):
        if cold[i]:
            region = "cold"
        elif any(a <= i <= b for a, b in inner):
            region = "inner"
        elif outer and outer[0] <= i <= outer[1]:
            region = "loop"
        else:
            region = "outside"
        c = counts[region]
        c["total"] += 1
        base = op.split(".")[0]
        c["int"] += base in _INT_OPS
        c["mufu"] += base == "MUFU"
        if region != "cold" and _is_data(op):
            bits[region]["load" if op.startswith("LDG") else "store"].add(_width(op))
    counts["cold"]["total"] += len(instrs) - end
    # ptxas's "N bytes spill stores": the bytes stored by STL outside cold paths. A cold path's STL is a local
    # array, not a spill (Triton 3.6's ptxas keeps Payne-Hanek's table of 2/pi bits in a 32-byte stack frame).
    spill = sum(_width(op) // 8 for i, (op, _, _) in enumerate(instrs[:end]) if op.startswith("STL") and not cold[i])
    return {
        "spill_stores": spill,
        "has_loop": outer is not None,
        **{name: dict(counts[name]) for name in counts},
        "bits": {name: {k: sorted(v) for k, v in d.items()} for name, d in bits.items()},
    }


def _target(text: str) -> str | None:
    m = _TARGET.search(text)
    return m.group(1) if m else None


def loop_tile_elements(ttgir: str) -> int | None:
    """Elements one iteration of the outermost ``scf.for`` handles: the largest tensor shape in its body."""
    start = ttgir.find("scf.for")
    if start < 0:
        return None
    # the body opens with the line's last brace (its result types may hold attribute braces: #ttg.slice<{...}>)
    depth, i = 0, ttgir.rindex("{", start, ttgir.index("\n", start))
    for j in range(i, len(ttgir)):
        depth += {"{": 1, "}": -1}.get(ttgir[j], 0)
        if depth == 0:
            break
    best = 0
    for dims in re.findall(r"tensor<((?:\d+x)+)", ttgir[start:j]):
        n = 1
        for d in dims.rstrip("x").split("x"):
            n *= int(d)
        best = max(best, n)
    return best or None


def analyze(kernel) -> dict:
    """Everything the model needs from Triton's ``CompiledKernel``: resources, options, region counts, tile size."""
    cubin = kernel.asm["cubin"]
    res = resources(cubin)
    return {
        "name": kernel.metadata.name,
        "num_warps": kernel.metadata.num_warps,
        "shared": int(kernel.metadata.shared),
        "registers": res.get("REG", 0),
        "stack": res.get("STACK", 0),  # the stack frame: spills live there
        "local": res.get("LOCAL", 0),
        "tile": loop_tile_elements(kernel.asm["ttgir"]),
        "regions": regions(disassemble(cubin)),
    }
