#!/usr/bin/env python3
"""Make mamba-ssm's and causal-conv1d's setup.py compile only the requested CUDA architectures.

Their setup.py files hard-code the ``-gencode`` list (nine architectures with CUDA 13, six with 12.8)
and ignore ``TORCH_CUDA_ARCH_LIST``; building all of them takes over an hour. This script inserts,
just before the line ``# HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI`` (after the list is built,
before it is used), two lines that replace every ``-gencode`` pair by the requested ones. It fails
loudly when the file does not look as expected, then evaluates each patched setup.py (with torch,
setuptools and nvcc stood in for) and checks that exactly the requested flags reach the CUDA
extension.

    python3 containers/trim_arch.py --arch "8.0,9.0" causal_conv1d-1.7.0/setup.py mamba_ssm-2.3.2.post1/setup.py

Architectures are given as in ``TORCH_CUDA_ARCH_LIST`` ("8.0", "9.0a", "9.0+PTX"), separated by commas,
semicolons or spaces. Standard library only: it runs in the image before brainmt is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ANCHOR = "# HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
MARKER = "# brainmt trim_arch"
HARDCODED = re.compile(r'cc_flag\.append\("arch=compute_\d+[a-z]?,code=sm_\d+[a-z]?"\)')
ARCH = re.compile(r"^(\d+)\.(\d)([af]?)(\+PTX)?$")

# Evaluates a setup.py with stand-ins for torch, setuptools, wheel and nvcc, and prints the -gencode flags
# of every CUDA extension it declares. Run in a child process: argv = setup.py path, nvcc version.
_EVALUATE = r'''
import json, os, runpy, subprocess, sys, types

setup_py, nvcc_version = os.path.abspath(sys.argv[1]), sys.argv[2]
extensions, setup_kwargs = [], {}

def module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod

class Command:
    def run(self):
        raise RuntimeError("stand-in command: nothing is built")

torch = module("torch", __version__="2.11.0", version=types.SimpleNamespace(cuda=nvcc_version, hip=None),
               _C=types.SimpleNamespace(_GLIBCXX_USE_CXX11_ABI=True))
torch.utils = module("torch.utils")
torch.utils.cpp_extension = module(
    "torch.utils.cpp_extension", CUDA_HOME="/stand-in/cuda", HIP_HOME=None, BuildExtension=Command,
    CUDAExtension=lambda **kw: extensions.append(kw) or kw, CppExtension=lambda **kw: kw)
module("setuptools", setup=lambda **kw: setup_kwargs.update(kw), find_packages=lambda *a, **kw: [])
module("wheel")
module("wheel.bdist_wheel", bdist_wheel=Command)
subprocess.check_output = lambda *a, **kw: (
    f"nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release {nvcc_version}, V{nvcc_version}.0\n")
os.chdir(os.path.dirname(setup_py))
runpy.run_path(setup_py, run_name="__main__")
if not extensions or setup_kwargs.get("ext_modules") != extensions:
    raise SystemExit("the setup.py declared no CUDA extension to setup()")
flags = []
for ext in extensions:
    nvcc = ext["extra_compile_args"]["nvcc"]
    flags.append([nvcc[i + 1] for i, flag in enumerate(nvcc) if flag == "-gencode"])
print(json.dumps(flags))
'''


def parse_archs(spec: str) -> list[str]:
    """``"8.0,9.0+PTX"`` -> the ``-gencode`` values: ``arch=compute_80,code=sm_80``, ... (PTX adds ``code=compute_XY``)."""
    gencodes: list[str] = []
    for token in re.split(r"[,;\s]+", spec.strip()):
        if not token:
            continue
        m = ARCH.match(token)
        if not m:
            raise ValueError(f"unrecognised CUDA architecture {token!r} (expected e.g. 8.0, 9.0, 9.0a, 9.0+PTX)")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        wanted = [f"arch=compute_{num},code=sm_{num}"] + ([f"arch=compute_{num},code=compute_{num}"] if m.group(4) else [])
        gencodes += [g for g in wanted if g not in gencodes]
    if not gencodes:
        raise ValueError("no CUDA architecture given")
    return gencodes


def trim_setup(text: str, gencodes: list[str], name: str = "setup.py") -> str:
    """``text`` of a setup.py with its hard-coded ``-gencode`` list replaced by ``gencodes``; ValueError if it looks different."""
    if MARKER in text:
        raise ValueError(f"{name} is already trimmed (it contains {MARKER!r}); start from the unpacked source package")
    lines = text.splitlines(keepends=True)
    anchors = [i for i, line in enumerate(lines) if line.strip().startswith(ANCHOR)]
    if len(anchors) != 1:
        raise ValueError(f"{name}: expected the line {ANCHOR!r} exactly once, found it {len(anchors)} times; "
                         "this setup.py differs from those trim_arch.py knows (mamba-ssm 2.3.2.post1, causal-conv1d 1.7.0)")
    at = anchors[0]
    before, after = "".join(lines[:at]), "".join(lines[at:])
    if not HARDCODED.search(before) or HARDCODED.search(after):
        raise ValueError(f"{name}: the hard-coded cc_flag.append(\"arch=compute_...\") lines are not all before {ANCHOR!r}")
    if "cc_flag" not in after:
        raise ValueError(f"{name}: cc_flag is not used after {ANCHOR!r}, so replacing it there would change nothing")
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
    flags = [x for g in gencodes for x in ("-gencode", g)]
    inserted = (f'{indent}cc_flag = [f for f in cc_flag if f != "-gencode" and not f.startswith("arch=")]  {MARKER}\n'
                f"{indent}cc_flag += {flags!r}  {MARKER}\n")
    return before + inserted + after


def gencode_flags(setup_py: Path, nvcc_version: str) -> list[list[str]]:
    """The ``-gencode`` values that ``setup_py`` passes to each CUDA extension, were nvcc ``nvcc_version``."""
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    for key in ("MAMBA_SKIP_CUDA_BUILD", "CAUSAL_CONV1D_SKIP_CUDA_BUILD"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", _EVALUATE, str(setup_py), nvcc_version], capture_output=True,
                          text=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluating {setup_py} failed:\n{proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def nvcc_release(cuda_home: str | None = None) -> str | None:
    """The release of the nvcc in ``$CUDA_HOME/bin`` or on PATH ("12.8"), or None when there is none."""
    nvcc = Path(cuda_home or os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    found = str(nvcc) if nvcc.exists() else shutil.which("nvcc")
    if not found:
        return None
    out = subprocess.run([found, "-V"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def main(argv: list[str] | None = None) -> int:
    """Trim each setup.py in place, then check what it would compile; exit 1 (with the reason) on any mismatch."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, help='CUDA architectures, e.g. "8.0,9.0" (as TORCH_CUDA_ARCH_LIST)')
    p.add_argument("--nvcc-version", help="check as if nvcc were this release (default: the installed nvcc's)")
    p.add_argument("setup_py", nargs="+", type=Path)
    args = p.parse_args(argv)
    try:
        gencodes = parse_archs(args.arch)
        nvcc = args.nvcc_version or nvcc_release()
        if nvcc is None:
            raise ValueError("no nvcc found (set CUDA_HOME) and no --nvcc-version given")
        for setup_py in args.setup_py:
            setup_py.write_text(trim_setup(setup_py.read_text(), gencodes, str(setup_py)))
            got = gencode_flags(setup_py, nvcc)
            if any(flags != gencodes for flags in got):
                raise ValueError(f"{setup_py}: after trimming, nvcc {nvcc} would get {got}, not {gencodes}")
            print(f"trim_arch: {setup_py} compiles {' '.join(g.split('=')[-1] for g in gencodes)} (nvcc {nvcc})")
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"trim_arch: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
