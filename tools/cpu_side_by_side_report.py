#!/usr/bin/env python3
"""Summary of tools/cpu-side-by-side.sh: reads the result lines of examples/cpu_step.rs and
tools/torch_cpu_step.py (one file), detects the machine's f32 FMA peak, prints a table and, last,
one line per shape:

    ratio <shape> llama-cpt/pytorch tokens/s: X | vs torch.compile: Y | peak RSS MiB ... | GEMM ...

    python tools/cpu_side_by_side_report.py RESULTS_FILE THREADS
"""
import re
import sys


def fma_peak(threads, cpuinfo_path="/proc/cpuinfo"):
    """(GFLOP/s, how) for f32 FMAs on `threads` cores, from the CPU flags, vendor, family and the
    clock /proc/cpuinfo reports (the highest `cpu MHz`; a turbo clock above it reads as > 100%)."""
    text = open(cpuinfo_path).read()

    def field(name):
        return re.search(rf"^{name}\s*:\s*(.*)$", text, re.M)

    flags = set(field("flags").group(1).split()) if field("flags") else set()
    vendor = field("vendor_id").group(1).strip() if field("vendor_id") else "?"
    family = int(field("cpu family").group(1)) if field("cpu family") else 0
    mhz = max((float(m) for m in re.findall(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)), default=0.0)
    if "avx512f" in flags:
        # Zen 4 (AMD family 0x19) runs a 512-bit FMA as two 256-bit halves: one per cycle per core.
        # Intel and Zen 5 issue two. (Some Intel Xeon Silver/Bronze parts have one 512-bit unit.)
        width, pipes = 512, (1 if vendor == "AuthenticAMD" and family == 0x19 else 2)
    elif "avx2" in flags and "fma" in flags:
        width, pipes = 256, 2
    elif "avx" in flags:
        width, pipes = 256, 1  # no FMA: a multiply and an add port, counted as one FMA
    else:
        width, pipes = 128, 1
    per_cycle = 2 * pipes * width // 32  # an FMA is 2 FLOPs per f32 lane
    gflops = threads * per_cycle * mhz / 1000
    how = (f"{threads} cores x {per_cycle} f32 FLOP/cycle ({pipes} x {width}-bit FMA, {vendor} family {family:#x}) "
           f"x {mhz:.0f} MHz (/proc/cpuinfo)")
    return gflops, how


def parse(path):
    """{(engine, shape): {key: value}}; engine is llama-cpt, torch-eager or torch-compile."""
    results = {}
    for line in open(path):
        words = line.split()
        if not words or words[0] not in ("llama-cpt", "torch"):
            continue
        if words[0] == "llama-cpt":
            engine, shape, rest = "llama-cpt", words[1], words[2:]
        else:
            engine, shape, rest = f"torch-{words[3]}", words[2], words[4:]
        if len(rest) % 2:
            raise SystemExit(f"{path}: a result line has an odd number of fields: {line!r}")
        results[(engine, shape)] = {k: float(v) for k, v in zip(rest[::2], rest[1::2])}
    return results


def main():
    path, threads = sys.argv[1], int(sys.argv[2])
    results = parse(path)
    shapes = list(dict.fromkeys(shape for _, shape in results))
    peak, how = fma_peak(threads)
    print(f"FMA peak: {peak:.0f} GFLOP/s = {how}")
    print("| shape | engine | s/step | tokens/s | peak RSS MiB | GEMM GFLOP/s | GEMM % of step |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        for engine in ("llama-cpt", "torch-eager", "torch-compile"):
            r = results.get((engine, shape))
            if r is None:
                continue
            gemm = share = ""
            if "gemm_seconds" in r and r["gemm_seconds"] > 0:
                gemm = f"{r['gemm_gflop'] / r['gemm_seconds']:.1f}"
                share = f"{100 * r['gemm_seconds'] / r['seconds']:.0f}%"
            print(f"| {shape} | {engine} | {r['seconds']:.3f} | {r['tokens/s']:.0f} | {r['peak_rss_mib']:.0f} | {gemm} | {share} |")
    missing = []
    for shape in shapes:
        ours = results.get(("llama-cpt", shape))
        eager = results.get(("torch-eager", shape))
        compiled = results.get(("torch-compile", shape))
        if ours is None or eager is None:
            missing.append(shape)
            continue
        line = f"ratio {shape} llama-cpt/pytorch tokens/s: {ours['tokens/s'] / eager['tokens/s']:.2f}"
        if compiled is not None:
            line += f" | vs torch.compile: {ours['tokens/s'] / compiled['tokens/s']:.2f}"
        line += f" | peak RSS MiB llama-cpt {ours['peak_rss_mib']:.0f} / pytorch eager {eager['peak_rss_mib']:.0f}"
        if compiled is not None:
            line += f" / compile {compiled['peak_rss_mib']:.0f}"
        if ours.get("gemm_seconds", 0) > 0:
            rate = ours["gemm_gflop"] / ours["gemm_seconds"]
            line += f" | GEMM {rate:.1f} GFLOP/s = {100 * rate / peak:.0f}% of FMA peak {peak:.0f} GFLOP/s"
        print(line)
    if missing:
        raise SystemExit(f"{path}: no llama-cpt or no PyTorch eager result for {', '.join(missing)}")


if __name__ == "__main__":
    main()
