"""Compiles every kernels/*.cu (with the common.cuh prelude, as llama-core's NVRTC step does)
for a GPU architecture without a GPU, through the NVRTC library of the `nvidia-cuda-nvrtc`
wheel, and prints each kernel's registers, spills and static shared memory from ptxas.
Exit status 1 on a compile error or a kernel that spills. Run by `cargo xtask kernels`.

    python kernel_check.py ROOT [--arch sm_90] [FILE.cu ...]
"""
import argparse
import ctypes
import glob
import pathlib
import re
import site
import sys


def nvrtc():
    for base in site.getsitepackages():
        for lib in glob.glob(f"{base}/nvidia/*/lib/libnvrtc.so*") + glob.glob(f"{base}/nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
            return ctypes.CDLL(lib)
    sys.exit("libnvrtc not found in this Python's site-packages (pip install nvidia-cuda-nvrtc)")


def compile_source(lib, name, source, arch):
    """NVRTC's (ok, log) for one source."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None):
        sys.exit(f"nvrtcCreateProgram failed for {name}")
    opts = [f"--gpu-architecture={arch}", "--std=c++17", "--device-as-default-execution-space",
            "--ptxas-options=-v"]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    status = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return status == 0, log.value.decode(errors="replace")


def kernels_of(log):
    """(kernel, registers, spill bytes, shared bytes) from ptxas' -v lines."""
    out, name, spills = [], None, 0
    for line in log.splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            name = m.group(1)
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = int(m.group(1)) + int(m.group(2))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            smem = re.search(r"(\d+) bytes smem", line)
            out.append((name, int(m.group(1)), spills, int(smem.group(1)) if smem else 0))
            name, spills = None, 0
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("files", nargs="*")
    args = parser.parse_args()
    root = pathlib.Path(args.root)
    prelude = (root / "kernels/common.cuh").read_text()
    files = [pathlib.Path(f) for f in args.files] or sorted((root / "kernels").glob("*.cu"))
    lib, failed = nvrtc(), False
    for path in files:
        source = prelude + f'\n#line 1 "{path.name}"\n' + path.read_text()
        ok, log = compile_source(lib, path.name, source, args.arch)
        if not ok:
            print(f"{path.name}: compile error\n{log}")
            failed = True
            continue
        kernels = kernels_of(log)
        spilling = [k for k in kernels if k[2] > 0]
        print(f"{path.name}: {len(kernels)} kernels, most registers "
              f"{max((k[1] for k in kernels), default=0)}, {len(spilling)} spilling")
        for name, regs, spills, smem in sorted(kernels):
            flag = "  SPILLS" if spills else ""
            print(f"  {name:40} {regs:4} registers {spills:6} spill bytes {smem:6} smem bytes{flag}")
        warnings = [l for l in log.splitlines() if "warning" in l]
        for w in warnings:
            print(f"  {w}")
        failed |= bool(spilling) or bool(warnings)
    sys.exit(1 if failed else 0)


main()
