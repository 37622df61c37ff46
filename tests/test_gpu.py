"""On a CUDA machine with mamba-ssm: the CUDA kernels against the pure-PyTorch scan, and a paper-size step.

Run with ``make test-gpu`` (``pytest -m gpu``). CPU runs deselect these with ``-m "not gpu"``.
Tolerances are relative Frobenius errors ||cuda - torch|| / ||torch||: fp32 1e-4, bf16 autocast 3e-2.
"""

from __future__ import annotations

import time

import pytest
import torch

from brainmt.config import load_config
from brainmt.models import build_model
from brainmt.models.layers import MambaBlock
from brainmt.models.mamba import cuda_kernels_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cuda_kernels_available(), reason="needs mamba-ssm and causal-conv1d"),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _block_pair(dim: int):
    torch.manual_seed(0)
    cuda_block = MambaBlock(dim, 0.0, d_state=16, expand=2, backend="cuda").cuda()
    torch_block = MambaBlock(dim, 0.0, d_state=16, expand=2, backend="torch").cuda()
    torch_block.load_state_dict(cuda_block.state_dict())
    return cuda_block, torch_block


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_cuda_and_torch_backends_agree(precision, tol):
    cuda_block, torch_block = _block_pair(512)
    x = torch.randn(2, 2049, 512, device="cuda")
    results = {}
    for name, block in (("cuda", cuda_block), ("torch", torch_block)):
        inp = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = block(inp)
        grad_out = torch.ones_like(out) / out.numel() ** 0.5
        out.backward(grad_out)
        grads = {n: p.grad.detach().clone() for n, p in block.named_parameters()}
        results[name] = (out.detach(), inp.grad.detach(), grads)
    out_err = _rel(results["cuda"][0], results["torch"][0])
    in_err = _rel(results["cuda"][1], results["torch"][1])
    param_errs = {n: _rel(results["cuda"][2][n], results["torch"][2][n]) for n in results["torch"][2]}
    worst = max(param_errs, key=param_errs.get)
    print(f"\n[{precision}] output rel err {out_err:.2e}, input-grad {in_err:.2e}, "
          f"worst param-grad {worst} {param_errs[worst]:.2e} (tolerance {tol:.0e})")
    assert out_err < tol and in_err < tol and param_errs[worst] < tol


@pytest.mark.parametrize("attention", ["spatial", "global"])
def test_paper_model_training_step_bf16_at_200_frames(attention):
    cfg = load_config("paper", ["model.backend=cuda", f"model.attention={attention}"]).model
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=True)
    x = torch.randn(1, 200, 1, *cfg.volume_shape, device="cuda")
    y = torch.randn(1, 1, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"\npaper model, T=200, bf16, attention={cfg.attention}: loss {loss.item():.4f}, "
          f"step times {[round(t, 3) for t in times]} s, peak memory {peak:.1f} GiB")
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.parameters())
