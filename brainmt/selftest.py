"""Self-test of an installation: versions, the compiled Mamba kernels, and a small BrainMT training step.

``python -m brainmt.selftest`` is what the Apptainer image's ``%test`` runs, and it runs anywhere else
too. On a GPU (``--device auto`` finds one) it imports the compiled kernels (``selective_scan_cuda``,
``causal_conv1d_cuda``, ``mamba_ssm``, ``causal_conv1d``), builds the ``debug`` model with
``model.backend=cuda``, checks its forward pass against the pure-PyTorch scan on the same weights, and
runs a backward pass in fp32 and under bf16 autocast. Without a GPU it runs the same model on the CPU
path (``model.backend=torch``); ``--require-kernels`` then still demands that the compiled extensions
import (an image built on a node without a GPU). Imports only torch and brainmt's config and models.
Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch

import brainmt
from brainmt.config import Device, literal_values

EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")   # compiled; import torch first
PACKAGES = {"mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d"}
FP32_TOLERANCE = 1e-3   # relative error of the CUDA kernels' output against the PyTorch scan, whole debug model


def version_of(distribution: str) -> str:
    """The installed version of ``distribution``, or "not installed"."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions(device: torch.device) -> dict[str, str]:
    """Python, torch, CUDA/cuDNN, the kernel packages, brainmt and the GPU, as printable strings."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "torch CUDA": str(torch.version.cuda),
           "cuDNN": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
           "brainmt": brainmt.__version__}
    out.update({dist: version_of(dist) for dist in PACKAGES.values()})
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["GPU"] = f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB"
    return out


def check_kernels(gpu: bool) -> str:
    """Import the compiled extensions and the kernel packages; raise on failure, return what was imported.

    Without a GPU a package whose import fails for a reason other than a missing module (Triton wanting a
    driver) is reported, not failed: the compiled extensions are what a build can break.
    """
    for name in EXTENSIONS:
        importlib.import_module(name)
    notes = []
    for name in PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            raise
        except Exception as exc:
            if gpu:
                raise
            notes.append(f"{name} needs a GPU to import ({type(exc).__name__}: {exc})")
    if gpu:
        from brainmt.models.mamba import check_backend

        check_backend("cuda")
    return ", ".join([*EXTENSIONS, *PACKAGES] if not notes else [*EXTENSIONS, *notes])


def _debug_model(backend: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The ``debug`` configuration's model with ``model.backend=backend`` on ``device``, seeded."""
    from brainmt.config import load_config
    from brainmt.models import build_model

    torch.manual_seed(seed)
    return build_model(load_config("debug", overrides=[f"model.backend={backend}"]).model).to(device)


def _input(model: torch.nn.Module, device: torch.device, batch: int = 2) -> torch.Tensor:
    """A seeded (batch, T, 1, D, H, W) input of the model's configured size."""
    cfg = model.cfg
    generator = torch.Generator().manual_seed(1)
    shape = (batch, cfg.num_frames, cfg.in_channels, *cfg.volume_shape)
    return torch.randn(shape, generator=generator).to(device)


def training_step(model: torch.nn.Module, x: torch.Tensor, autocast: torch.dtype | None = None) -> str:
    """One forward and backward pass; raise unless the output is (B, 1) and finite and every parameter got a finite gradient."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        out = model(x)
    if tuple(out.shape) != (x.shape[0], 1) or not torch.isfinite(out).all():
        raise RuntimeError(f"forward gave shape {tuple(out.shape)}, finite: {bool(torch.isfinite(out).all())}")
    out.float().square().mean().backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None]
    bad = [n for n, p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
    if missing or bad:
        raise RuntimeError(f"parameters without a gradient: {missing[:3]}, with a non-finite one: {bad[:3]}")
    scan_grad = sum(float(p.grad.abs().sum()) for n, p in params if n.endswith("A_log"))
    if scan_grad == 0.0:
        raise RuntimeError("the selective scan's A received no gradient")
    return f"output {tuple(out.shape)}, {len(params)} parameter gradients finite"


def _step(backend: str, device: torch.device, autocast: torch.dtype | None) -> str:
    """A training step of a fresh ``debug`` model with ``backend`` on ``device``."""
    model = _debug_model(backend, device).train()
    return training_step(model, _input(model, device), autocast)


def cuda_matches_torch(device: torch.device) -> str:
    """The CUDA-kernel model against the PyTorch-scan model with the same weights, fp32 forward; raise above tolerance."""
    cuda_model = _debug_model("cuda", device).eval()
    torch_model = _debug_model("torch", device).eval()
    torch_model.load_state_dict(cuda_model.state_dict())
    x = _input(cuda_model, device)
    with torch.no_grad():
        a, b = cuda_model(x), torch_model(x)
    err = float((a - b).norm() / b.norm().clamp_min(1e-12))
    if not err <= FP32_TOLERANCE:
        raise RuntimeError(f"relative error {err:.2e} > {FP32_TOLERANCE:.0e}")
    return f"relative error {err:.1e} (tolerance {FP32_TOLERANCE:.0e})"


def run(device_name: str = "auto", require_kernels: bool = False, out: Callable[[str], None] = print) -> int:
    """Run every check, print one line each and the versions; 0 when all passed, else 1."""
    gpu_visible = torch.cuda.is_available()
    if device_name == "cuda" and not gpu_visible:
        out("FAIL device: --device cuda but torch sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        return 1
    device = torch.device("cuda" if device_name == "cuda" or (device_name == "auto" and gpu_visible) else "cpu")
    gpu = device.type == "cuda"
    for key, value in versions(device).items():
        out(f"     {key}: {value}")
    checks: list[tuple[str, Callable[[], str]]] = []
    if gpu or require_kernels:
        checks.append(("compiled kernels import", partial(check_kernels, gpu)))
    if gpu:
        checks.append(("CUDA kernels match the PyTorch scan (fp32)", partial(cuda_matches_torch, device)))
        checks.append(("training step on the GPU, backend cuda, fp32", partial(_step, "cuda", device, None)))
        checks.append(("training step on the GPU, backend cuda, bf16 autocast",
                       partial(_step, "cuda", device, torch.bfloat16)))
    else:
        checks.append(("training step on the CPU path, backend torch, fp32", partial(_step, "torch", device, None)))
    failed = 0
    for name, check in checks:
        start = time.perf_counter()
        try:
            detail = check()
        except Exception as exc:   # every failure is reported, then the next check runs
            failed += 1
            out(f"FAIL {name}: {type(exc).__name__}: {exc}")
            continue
        out(f"ok   {name}: {detail} [{time.perf_counter() - start:.1f} s]")
    path = "GPU (CUDA kernels)" if gpu else "CPU (pure-PyTorch scan)"
    out(f"selftest {'passed' if not failed else 'FAILED'} on the {path} path: {len(checks) - failed} of {len(checks)} checks")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m brainmt.selftest [--device auto|cpu|cuda] [--require-kernels]``."""
    p = argparse.ArgumentParser(prog="python -m brainmt.selftest", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=list(literal_values(Device)), default="auto",
                   help="auto: the GPU when torch sees one, else the CPU path")
    p.add_argument("--require-kernels", action="store_true",
                   help="fail unless the compiled mamba-ssm / causal-conv1d kernels import, even without a GPU")
    args = p.parse_args(argv)
    return run(args.device, args.require_kernels)


if __name__ == "__main__":
    sys.exit(main())
