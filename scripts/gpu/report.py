"""The small reports of scripts/gpu_run.sh, one per subcommand:

    python3 scripts/gpu/report.py env               # Python, packages, torch, the GPU
    python3 scripts/gpu/report.py upgrad            # torchjd, qpsolvers, quadprog import; UPGrad runs
    python3 scripts/gpu/report.py first-call        # fusedjd's build and its first GPU call
    python3 scripts/gpu/report.py headline FILE.md  # the benchmark's n = 1e8 float32 rows, one line each
    python3 scripts/gpu/report.py wheels DIR        # the wheels in DIR: intact, named, tagged
"""

from __future__ import annotations

import sys


def env() -> None:
    import importlib.metadata as md
    import os
    import sysconfig

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "MISSING"

    header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    names = ["torch", "numpy", "scipy", "setuptools", "pybind11", "ninja", "pytest", "pytest-timeout", "pytest-xdist",
             "matplotlib", "triton"]
    print("Python.h:", "present" if os.path.exists(header) else "MISSING", "| packages:",
          ", ".join(f"{p} {version(p)}" for p in names))
    import torch
    from torch.utils import cpp_extension

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); GPU visible: {torch.cuda.is_available()}; "
          f"ninja: {cpp_extension.is_ninja_available()}; cpp_extension.CUDA_HOME: {cpp_extension.CUDA_HOME}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
              f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB, {total / 2**30:.0f} GiB ({free / 2**30:.0f} free)")


def upgrad() -> None:
    import importlib.metadata as md

    import qpsolvers
    import torch
    from torchjd.aggregation import UPGrad

    import quadprog  # noqa: F401

    UPGrad()(torch.randn(3, 5))
    print("torchjd", md.version("torchjd"), "| qpsolvers", qpsolvers.__version__, "| quadprog", md.version("quadprog"),
          "| UPGrad OK")


def first_call() -> None:
    import torch

    import fusedjd
    from fusedjd import ops
    from fusedjd.reference import rel_err

    print("build_info:", fusedjd.build_info(), "| has_cuda_kernels:", ops.has_cuda_kernels(),
          "| from", fusedjd.__file__, flush=True)
    J = torch.randn(20, 100003)
    err = rel_err(ops.gramian(J.cuda(), [50000, 50003]), ops.gramian(J, [50000, 50003]))
    print("first GPU call: ops.gramian rel err vs CPU:", err)


def headline(path: str) -> None:
    section, cols = None, None
    for line in open(path):
        if line.startswith("### "):
            section, cols = line[4:].split(":")[0], None
        elif line.startswith("| m |"):
            cols = [c.strip() for c in line.strip().strip("|").split("|")]
        elif line.startswith("| ") and section and cols and line[2].isdigit():
            row = dict(zip(cols, [c.strip() for c in line.strip().strip("|").split("|")]))
            if row.get("n") == "1e8" and row.get("dtype") == "float32" and "time / floor" in row:
                print(f"{section[:18]:18s} m={row['m']:>3} n=1e8 fp32: {row.get('fusedjd', '—'):>10}, "
                      f"time/floor {row['time / floor']:>5}, speedup {row.get('speedup', '—')}")


def wheels(folder: str) -> None:
    import email.parser
    import glob
    import os
    import zipfile

    expected = {"torchjd": "0.18.0", "qpsolvers": "4.13.0", "quadprog": "0.1.14"}
    for name, version in expected.items():
        (path,) = glob.glob(os.path.join(folder, f"{name}-{version}-*.whl"))
        with zipfile.ZipFile(path) as z:
            assert z.testzip() is None, f"{path}: a corrupt member"
            meta = [f for f in z.namelist() if f.endswith(".dist-info/METADATA")]
            msg = email.parser.Parser().parsestr(z.read(meta[0]).decode())
            assert (msg["Name"].lower(), msg["Version"]) == (name, version), (msg["Name"], msg["Version"])
            info = [f for f in z.namelist() if f.endswith(".dist-info/WHEEL")]
            tags = [ln.split(": ", 1)[1] for ln in z.read(info[0]).decode().splitlines() if ln.startswith("Tag:")]
        print(f"{os.path.basename(path)}: zip intact, METADATA {name} {version}, tags {' '.join(tags)}")


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    cmd, args = sys.argv[1], sys.argv[2:]
    {"env": env, "upgrad": upgrad, "first-call": first_call, "headline": headline, "wheels": wheels}[cmd](*args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
