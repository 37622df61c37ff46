"""Worker functions for the two-process gloo tests (spawned processes import this module)."""

from __future__ import annotations

import os

import torch


def sgd_steps(forward, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int = 3):
    """Yield the (detached) loss of each of ``steps`` optimizer steps on the same batch."""
    from brainmt.train.step import compute_loss

    for _ in range(steps):
        loss = compute_loss(forward, x, y, "regression", torch.device("cpu"), "fp32")
        loss.backward()
        opt.step()
        opt.zero_grad()
        yield loss.detach()


def ddp_step_worker(rank: int, world: int, port: int, x: torch.Tensor, y: torch.Tensor, out_path: str) -> None:
    """One DDP training step on this rank's half of (x, y); rank 0 saves losses and weights."""
    from brainmt.config import load_config
    from brainmt.models import build_model
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model(load_config("debug").model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    half = len(x) // world
    xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
    losses = []
    for loss in sgd_steps(ddp, opt, xs, ys):
        mean = loss.clone()
        torch.distributed.all_reduce(mean)
        losses.append(float(mean) / world)
    params = [p.detach().clone() for p in model.parameters()]
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, params)
    if rank == 0:
        torch.save({"losses": losses, "params": gathered}, out_path)
    torch.distributed.destroy_process_group()


def running_standardize_worker(rank: int, world: int, port: int, batches: list, out_path: str) -> None:
    """``RunningStandardize`` trained under a gloo process group, each rank on its own part of every batch (rank r:
    rows r, r + world, ...; unequal sizes); every rank saves its buffers."""
    from brainmt.models.layers import RunningStandardize

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    norm = RunningStandardize(batches[0].shape[1]).train()
    for x in batches:
        norm(x[rank::world])
        norm(x[:0])                                  # an empty global batch changes nothing
    torch.save({k: b.clone() for k, b in norm.named_buffers()}, f"{out_path}.{rank}")
    torch.distributed.destroy_process_group()
