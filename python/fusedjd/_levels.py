"""The compiler flags of each CPU instruction-set level on x86-64, best first: what setup.py builds
the CPU kernels with (one library per level, see _cpu.py), and what the benchmark builds its probes
with for the level a process loaded. Nothing is imported here: setup.py reads this file before
fusedjd is built."""

X86 = {
    # AVX-512 (F, BW, DQ, VL, CD) with AVX2, FMA, F16C, and the bfloat16 dot product (Zen 4,
    # Sapphire Rapids, Cooper Lake)
    "avx512": ["-march=x86-64-v4", "-mavx512bf16"],
    "avx2": ["-march=x86-64-v3"],  # AVX2, FMA, F16C (Haswell, Zen 1-3)
    "default": ["-march=x86-64"],  # SSE2: any x86-64 CPU
}
