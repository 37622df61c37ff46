"""On a CUDA machine with mamba-ssm: the CUDA kernels against the pure-PyTorch scan, the optimised model
against the plain one, and paper-size steps.

Run with ``make test-gpu`` (``pytest -m gpu``). CPU runs deselect these with ``-m "not gpu"``.
Tolerances are relative Frobenius errors ||a - b|| / ||b||: fp32 1e-4, bf16 autocast 3e-2 (one block);
optimised vs plain paper model (same weights): fp32 1e-4; bf16 output 2e-2, all gradients together 3e-2,
worst single parameter 1e-1 (bf16 keeps 8 bits of mantissa: 4e-3 per rounding).
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


def _block_pair(dim: int, fused: bool = False):
    torch.manual_seed(0)
    cuda_block = MambaBlock(dim, 0.0, d_state=16, expand=2, backend="cuda", fused=fused).cuda()
    torch_block = MambaBlock(dim, 0.0, d_state=16, expand=2, backend="torch").cuda()
    torch_block.load_state_dict(cuda_block.state_dict())
    return cuda_block, torch_block


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_cuda_and_torch_backends_agree(precision, tol, fused):
    cuda_block, torch_block = _block_pair(512, fused)
    assert cuda_block.mixer.uses_fused(torch.device("cuda")) == fused
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
    print(f"\n[{precision}{', fused' if fused else ''}] output rel err {out_err:.2e}, input-grad {in_err:.2e}, "
          f"worst param-grad {worst} {param_errs[worst]:.2e} (tolerance {tol:.0e})")
    assert out_err < tol and in_err < tol and param_errs[worst] < tol


PLAIN = ["model.fused_kernels=false", "model.stem_chunk_frames=0", "model.checkpointing=none", "model.sdpa_backend=auto",
         "model.channels_last=false", "model.compile=false"]


def _step_results(overrides: list[str], precision: str, frames: int) -> tuple[torch.Tensor, dict]:
    """Output and parameter gradients of one forward/backward of the paper model (seed 0 weights, no stochastic depth)."""
    cfg = load_config("paper", ["model.backend=cuda", "model.attention=global", "model.drop_path_rate=0", *overrides]).model
    torch.manual_seed(0)
    model = build_model(cfg).cuda().train()
    torch.manual_seed(1)
    x = torch.randn(2, frames, 1, *cfg.volume_shape, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(x)
    out.float().sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    unused = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    assert not unused, f"parameters without a gradient (DDP would stall on them): {unused}"
    return out.detach().float(), grads


# on top of the paper config's options (fused op, stem chunks, cuDNN attention)
OPTIMISED = ["model.stem_chunk_frames=5", "model.checkpointing=all", "model.channels_last=true"]


@pytest.mark.parametrize("precision, extra, tol_out, tol_all, tol_worst", [
    ("fp32", [], 1e-4, 1e-4, 1e-4), ("bf16", [], 2e-2, 3e-2, 1e-1), ("bf16", ["model.compile=true"], 2e-2, 3e-2, 1e-1)])
def test_optimised_model_matches_the_plain_one(precision, extra, tol_out, tol_all, tol_worst):
    """The speed/memory options (fused Mamba, stem chunks, checkpointing, SDPA choice, compile) keep the numerics."""
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions in full precision on both sides
    try:
        plain_out, plain_grads = _step_results(PLAIN, precision, 12)
        opt_out, opt_grads = _step_results(OPTIMISED + extra, precision, 12)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert plain_grads.keys() == opt_grads.keys()
    out_err = _rel(opt_out, plain_out)
    all_err = _rel(torch.cat([g.flatten() for g in opt_grads.values()]), torch.cat([g.flatten() for g in plain_grads.values()]))
    errs = {n: _rel(opt_grads[n], plain_grads[n]) for n in plain_grads}
    worst = max(errs, key=errs.get)
    label = precision + (" + compile" if extra else "")
    print(f"\n[{label}] optimised vs plain, paper model, T=12, batch 2: output {out_err:.2e}, all gradients "
          f"{all_err:.2e}, worst parameter {worst} {errs[worst]:.2e} (tolerances {tol_out:.0e}, {tol_all:.0e}, {tol_worst:.0e})")
    assert out_err < tol_out and all_err < tol_all and errs[worst] < tol_worst


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
    for _ in range(4):
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


def test_paper_model_head_is_float32_and_head_norm_learns_statistics_on_cuda():
    """bf16 autocast on CUDA: the logit comes out in float32, ``head_norm: running`` updates its statistics in
    training (every parameter gets a gradient) and leaves them alone in evaluation."""
    cfg = load_config("paper", ["model.backend=cuda", "model.head_norm=running", "model.drop_path_rate=0"]).model
    torch.manual_seed(0)
    model = build_model(cfg).cuda().train()
    x = torch.randn(2, 12, 1, *cfg.volume_shape, device="cuda")
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.float32
        out.sum().backward()
    unused = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    assert not unused, f"parameters without a gradient: {unused}"
    stats = {n: b.clone() for n, b in model.head_norm.named_buffers()}
    assert int(stats["updates"]) == 3 and stats["mean"].abs().sum() > 0 and (stats["var"] > 0).all()
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        first, second = model(x), model(x)
    assert first.dtype == torch.float32 and torch.equal(first, second)
    assert all(torch.equal(stats[n], b) for n, b in model.head_norm.named_buffers())
