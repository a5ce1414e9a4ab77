#!/usr/bin/env python3
"""Per kernel and arch, what the SASS of the kernels' fatbin holds (cuobjdump -sass output on stdin
or as a file), beside ptxas' register/spill report: instruction classes (HMMA, LDGSTS, LDSM, LDS/STS
and LDG/STG by width, BAR, SHFL, MUFU, atomics) and, for the loop with the most HMMAs, its
instructions per HMMA (the issue cost of a tensor-core op). `--require` checks (exit 1 on failure):
the attention kernels named keep their LDGSTS and LDSM, no kernel of the hot list spills, the hot
memory-bound kernels keep their 128-bit global loads and stores (the 16-byte packs; narrower
accesses remain only in the paths for unaligned views and row tails).

Usage: sass_report.py SASS_FILE PTXAS_REPORT [--require]
"""
import re
import sys
from collections import Counter, defaultdict

# Kernels whose SASS must show the sm_80 data-movement instructions (cuda/attention_fa2.cu).
PIPELINED = ("attn_fa2_fwd_d64_bf16", "attn_fa2_fwd_d128_bf16")
# The five-matmul backward (cuda/attention.cu, FUSED_DQ): dS fragments by ldmatrix, dQ/dK/dV by
# RED adds; losing either means the kernel is no longer the fused one.
FUSED_BWD = tuple(f"attn_bwd_fused_d{d}_{t}" for d in (64, 128) for t in ("f32", "bf16"))
# Memory-bound kernels that must read (and, the second set, write) their data in 16-byte packs
# (cuda/common.cuh's load_pack/store_pack): the bf16 entry points, the casts, AdamW, dw's reduction.
PACKED_LOADS = ("add_bf16", "add_assign_bf16", "scale_bf16", "swiglu_fwd_bf16", "swiglu_bwd_bf16", "rope_fwd_bf16",
                "rmsnorm_fwd_bf16", "rmsnorm_bwd_dx_bf16", "rmsnorm_bwd_dw_partial_bf16", "rmsnorm_bwd_dw_reduce",
                "add_rmsnorm_fwd_bf16", "cross_entropy_fwd_bf16", "cross_entropy_bwd_bf16", "embedding_fwd_bf16",
                "embedding_bwd_bf16", "sum_squares_partial_bf16", "cast_f32_to_bf16", "cast_bf16_to_f32", "adamw_multi")
PACKED_STORES = tuple(k for k in PACKED_LOADS if k not in ("cross_entropy_fwd_bf16", "sum_squares_partial_bf16"))
# Kernels that must not spill.
HOT_PREFIXES = ("attn_", "rmsnorm_", "add_rmsnorm_", "swiglu_", "rope_", "cross_entropy_", "adamw_", "embedding_")

LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse(text):
    """{(arch, function): [(address, opcode, operands)]} from cuobjdump -sass text."""
    out, arch, fn = defaultdict(list), "?", None
    for line in text.splitlines():
        m = re.search(r"code for (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            fn = m.group(1)
            continue
        m = LINE.search(line)
        if m and fn:
            out[(arch, fn)].append((int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def classify(op):
    base = op.split(".")[0]
    # Generic LD/ST of global data (pointers read from memory, as adamw_multi's table, are not
    # known to be global): counted with LDG/STG.
    base = {"LD": "LDG", "ST": "STG"}.get(base, base)
    if base in ("LDG", "STG", "LDS", "STS"):
        width = next((w for w in ("128", "64", "U8", "S8", "U16", "S16") if f".{w}" in op), "32")
        return f"{base}.{width}"
    if base in ("RED", "REDG", "ATOM", "ATOMS", "ATOMG"):
        return "ATOM/RED"
    return base


def hot_loop(instrs):
    """(instructions, HMMAs) of the backward-branch loop holding the most HMMAs, or None."""
    best = None
    for addr, op, operands in instrs:
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)", operands)
        if not m or int(m.group(1), 16) >= addr:
            continue
        start = int(m.group(1), 16)
        body = [o for a, o, _ in instrs if start <= a <= addr]
        hmma = sum(o.startswith("HMMA") for o in body)
        if hmma and (best is None or hmma > best[1]):
            best = (len(body), hmma)
    return best


def ptxas(path):
    """{(arch, function): (registers, spill bytes stored + loaded)} from ptxas -v output (build.rs
    keeps it as ptxas-report.txt)."""
    out, key, spill = {}, None, 0
    for line in open(path):
        m = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
        if m:
            key, spill = (m.group(2), m.group(1)), 0
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and key:
            spill = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and key:
            out[key] = (int(m.group(1)), spill)
            key = None
    return out


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    funcs = parse(open(sys.argv[1]).read())
    report = ptxas(sys.argv[2])
    require = "--require" in sys.argv
    cols = ["HMMA", "LDGSTS", "LDSM", "LDS.128", "LDS.64", "LDS.32", "STS.128", "STS.32", "LDG.128", "LDG.64", "LDG.32",
            "LDG.U16", "STG.128", "STG.64", "STG.32", "STG.U16", "BAR", "SHFL", "MUFU", "ATOM/RED"]
    print("kernel arch regs spill " + " ".join(c.lower() for c in cols) + " loop-instr/hmma")
    failures = []
    for (arch, fn), instrs in sorted(funcs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        counts = Counter(classify(op) for _, op, _ in instrs)
        regs, spill = report.get((arch, fn), ("?", 0))
        loop = hot_loop(instrs)
        per = f"{loop[0] / loop[1]:.1f}" if loop else "-"
        print(f"{fn} {arch} {regs} {spill} " + " ".join(str(counts.get(c, 0)) for c in cols) + f" {per}")
        if fn in PIPELINED and (counts["LDGSTS"] == 0 or counts["LDSM"] == 0):
            failures.append(f"{fn} ({arch}): LDGSTS {counts['LDGSTS']}, LDSM {counts['LDSM']}: the pipelined attention lost its cp.async/ldmatrix")
        if fn in FUSED_BWD and (counts["ATOM/RED"] == 0 or counts["LDSM"] == 0):
            failures.append(f"{fn} ({arch}): RED {counts['ATOM/RED']}, LDSM {counts['LDSM']}: the fused backward lost its atomics/ldmatrix")
        if fn in PACKED_LOADS and counts["LDG.128"] == 0:
            failures.append(f"{fn} ({arch}): no 128-bit global load: the memory-bound kernel lost its 16-byte packs")
        if fn in PACKED_STORES and counts["STG.128"] == 0:
            failures.append(f"{fn} ({arch}): no 128-bit global store: the memory-bound kernel lost its 16-byte packs")
        if fn.startswith(HOT_PREFIXES) and spill:
            failures.append(f"{fn} ({arch}) spills {spill} bytes")
    if require and failures:
        for f in failures:
            print("sass-report: FAIL " + f, file=sys.stderr)
        sys.exit(1)
    if require:
        print("sass-report: pipelined attention keeps LDGSTS and LDSM, the fused backward RED and LDSM; the memory-bound kernels access memory in 16-byte packs; "
              "no hot kernel spills")


if __name__ == "__main__":
    main()
