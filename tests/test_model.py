"""BrainMT on the CPU: size, shapes, bidirectionality, initialisation, options and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from brainmt.config import load_config
from brainmt.models import build_model, parameter_breakdown
from brainmt.models.mamba import BiMambaMixer, cuda_kernels_available


def _debug(*overrides):
    return load_config("debug", list(overrides)).model


def test_paper_model_has_40_to_50_million_parameters():
    model = build_model(load_config("paper").model)
    counts = parameter_breakdown(model)
    assert 40e6 <= counts["total"] <= 50e6, counts
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    assert model.grid == (6, 7, 6) and model.num_spatial_tokens == 252


@pytest.mark.parametrize("volume_shape", [[20, 24, 20], [33, 17, 26]])
@pytest.mark.parametrize("frames", [1, 5, 8, 13])
def test_forward_backward_any_frames_two_volume_sizes(volume_shape, frames):
    torch.manual_seed(0)
    model = build_model(_debug(f"model.volume_shape={volume_shape}"))
    x = torch.randn(2, frames, 1, *volume_shape, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 1)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for n, p in model.named_parameters() if "temporal_embed" not in n)


def test_input_grid_other_than_configured_is_interpolated():
    model = build_model(_debug())  # configured for 20x24x20
    out = model(torch.randn(1, 4, 1, 40, 24, 30))
    assert out.shape == (1, 1)


def _cls_after_mamba(model, x):
    with torch.no_grad():
        return model.mamba_features(x)[:, 0]


@pytest.mark.parametrize("which", [0, -1])
def test_class_token_sees_first_and_last_frame(which):
    torch.manual_seed(0)
    model = build_model(_debug()).eval()
    x = torch.randn(1, 6, 1, 20, 24, 20)
    changed = x.clone()
    changed[:, which] += torch.randn_like(changed[:, which])
    delta = (_cls_after_mamba(model, x) - _cls_after_mamba(model, changed)).abs().max()
    # the forward-only control below changes by exactly 0; here the last frame reaches the class token only
    # through the backward SSM state (at init ~5e-4 of its magnitude), the first also through the causal conv
    assert delta > 1e-6
    with torch.no_grad():
        assert not torch.allclose(model(x), model(changed))


def test_forward_only_mamba_class_token_sees_nothing():
    """The official code's defect, reproduced on purpose: with one direction the cls token at 0 is blind."""
    torch.manual_seed(0)
    model = build_model(_debug("model.bidirectional=false")).eval()
    x = torch.randn(1, 6, 1, 20, 24, 20)
    changed = x.clone()
    changed[:, -1] += 1.0
    torch.testing.assert_close(_cls_after_mamba(model, x), _cls_after_mamba(model, changed))


def test_directions_have_separate_parameters_and_dt_init_survives():
    cfg = _debug()
    model = build_model(cfg)
    mixer = model.mamba_blocks[0].mixer
    fwd, bwd = mixer.forward_branch, mixer.backward_branch
    assert fwd.conv1d.weight is not bwd.conv1d.weight and not torch.equal(fwd.dt_proj.bias, bwd.dt_proj.bias)
    for block in model.mamba_blocks:
        for branch in (block.mixer.forward_branch, block.mixer.backward_branch):
            dt = F.softplus(branch.dt_proj.bias)
            assert dt.min() >= cfg.dt_min * 0.999 and dt.max() <= cfg.dt_max * 1.001
            assert branch.dt_proj.bias.std() > 0.1  # spread over [dt_min, dt_max], not zeroed
            torch.testing.assert_close(-torch.exp(branch.A_log[0]), -torch.arange(1.0, cfg.d_state + 1))


def test_attention_blocks_own_their_norms_and_mlps_and_there_is_a_final_norm():
    model = build_model(_debug("model.attention_depth=3"))
    blocks = model.attention_blocks
    assert len({id(b.mlp) for b in blocks}) == 3 and len({id(b.norm1) for b in blocks}) == 3
    assert isinstance(model.norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("attention", ["global", "spatial", "frame"])
def test_attention_scopes_run(attention):
    model = build_model(_debug(f"model.attention={attention}"))
    assert model(torch.randn(2, 3, 1, 20, 24, 20)).shape == (2, 1)


def test_space_order_is_the_time_order_permuted_frame_by_frame():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 1, 20, 24, 20)
    models = {order: build_model(_debug(f"model.scan_order={order}")) for order in ("time", "space")}
    models["space"].load_state_dict(models["time"].state_dict())
    (time_seq, k, frames), (space_seq, _, _) = (models[o].tokens(x) for o in ("time", "space"))
    torch.testing.assert_close(space_seq[:, 0], time_seq[:, 0])
    by_location = time_seq[:, 1:].view(2, k, frames, -1)
    torch.testing.assert_close(space_seq[:, 1:].view(2, frames, k, -1), by_location.transpose(1, 2))
    assert space_seq[:, 1 + 1].equal(time_seq[:, 1 + frames])    # space: location 1 of frame 0 comes second


@pytest.mark.parametrize("attention", ["global", "spatial", "frame"])
def test_scan_order_changes_only_what_the_mamba_stack_sees(attention):
    """Without Mamba blocks both orders give the same output; with them the output differs."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 1, 20, 24, 20)
    for depth, same in ((0, True), (1, False)):
        outs = []
        for order in ("time", "space"):
            torch.manual_seed(1)
            model = build_model(_debug(f"model.scan_order={order}", f"model.attention={attention}",
                                       f"model.mamba_depth={depth}")).eval()
            with torch.no_grad():
                outs.append(model(x))
        assert torch.allclose(outs[0], outs[1], atol=1e-5) == same, (depth, outs)


@pytest.mark.parametrize("norm", ["none", "center", "zscore"])
def test_input_norm_removes_what_it_says_per_voxel(norm):
    """center: a static volume added to every frame changes nothing; zscore: nor does a per-voxel positive scale."""
    torch.manual_seed(0)
    model = build_model(_debug(f"model.input_norm={norm}")).eval()
    x = torch.randn(2, 5, 1, 20, 24, 20)
    static = 3 * torch.randn(1, 1, 1, 20, 24, 20)
    scale = torch.rand(1, 1, 1, 20, 24, 20) + 0.5
    with torch.no_grad():
        out, shifted, scaled = model(x), model(x + static), model(x * scale)
    assert torch.allclose(out, shifted, atol=1e-5) == (norm != "none")
    assert torch.allclose(out, scaled, atol=1e-5) == (norm == "zscore")
    with torch.no_grad():
        centred = model.normalise_input(x + static)
    if norm != "none":
        torch.testing.assert_close(centred.mean(dim=1), torch.zeros_like(centred[:, 0]), atol=1e-5, rtol=0)
    constant = torch.ones(1, 4, 1, 20, 24, 20)      # a voxel constant in time (outside the brain) maps to 0, not NaN
    assert torch.isfinite(model.normalise_input(constant)).all()


@pytest.mark.parametrize("stem_norm", ["group", "none"])
def test_stem_norm_none_keeps_a_regions_signal_out_of_distant_tokens(stem_norm):
    """With the per-frame GroupNorm a fluctuation in one corner rescales the tokens at the far corner; without it
    (model.stem_norm=none) they stay exactly as they were."""
    torch.manual_seed(0)
    model = build_model(_debug(f"model.stem_norm={stem_norm}", "model.volume_shape=[64,64,64]")).eval()
    x = torch.randn(1, 2, 1, 64, 64, 64)
    changed = x.clone()
    changed[..., :8, :8, :8] *= 5
    with torch.no_grad():
        far = [model.stem(v.flatten(0, 1))[0].view(2, 4, 4, 4, -1)[:, 3, 3, 3] for v in (x, changed)]
    assert torch.equal(far[0], far[1]) == (stem_norm == "none")
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.stem.modules()) == (stem_norm == "group")


def test_stem_without_norm_keeps_the_inputs_scale():
    """Without GroupNorm the paper's stem (fan_in init) passes a unit-scale input on at about unit scale, above the
    position embeddings (fan_out would shrink it about 50-fold, below them)."""
    torch.manual_seed(0)
    cfg = load_config("paper", ["model.stem_norm=none", "model.volume_shape=[48,56,48]"]).model
    model = build_model(cfg).eval()
    x = torch.randn(2, 1, 48, 56, 48)
    with torch.no_grad():
        tokens = model.stem(x)[0]
    assert 0.3 < tokens.std().item() < 3
    assert tokens.std().item() > 10 * model.pos_embed.std().item()


@pytest.mark.parametrize("options", [["model.checkpointing=all"], ["model.checkpointing=attention"],
                                     ["model.stem_chunk_frames=3", "model.channels_last=true"],
                                     ["model.sdpa_backend=math", "model.compile=true"]])
def test_speed_and_memory_options_give_the_same_outputs_and_gradients(options):
    x = torch.randn(2, 4, 1, 20, 24, 20)
    results = []
    for overrides in ([], options):
        torch.manual_seed(0)
        model = build_model(_debug("model.drop_path_rate=0.2", "model.attention_depth=2", *overrides)).train()
        torch.manual_seed(1)
        out = model(x)
        out.sum().backward()
        results.append((out.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_last_attention_block_computes_only_the_class_token():
    torch.manual_seed(0)
    block = build_model(_debug()).attention_blocks[0].eval()
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(block(x, first_only=True), block(x)[:, :1])


def test_model_runs_on_the_meta_device_for_shape_and_flop_counting():
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(load_config("paper").model)
        x = torch.empty(1, 4, 1, 91, 109, 91)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        out.sum().backward()
    assert out.shape == (1, 1) and out.device.type == "meta"
    assert counter.get_total_flops() > 1e11


def test_stochastic_depth_is_random_in_training_and_off_in_eval():
    torch.manual_seed(0)
    model = build_model(_debug("model.drop_path_rate=0.5", "model.mamba_depth=4"))
    x = torch.randn(4, 3, 1, 20, 24, 20)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_too_many_frames_is_a_clear_error():
    model = build_model(_debug("model.max_frames=10"))
    with pytest.raises(ValueError, match="11 frames, more than model.max_frames=10"):
        model(torch.randn(1, 11, 1, 20, 24, 20))
    with pytest.raises(ValueError, match=r"expects \(B, T, C, D, H, W\)"):
        model(torch.randn(1, 1, 20, 24, 20))


@pytest.mark.skipif(cuda_kernels_available(), reason="mamba-ssm is installed here")
def test_cuda_backend_without_mamba_ssm_says_how_to_fix():
    with pytest.raises(ImportError, match=r"model.backend=cuda needs the compiled mamba-ssm.*brainmt\[gpu\]"):
        build_model(_debug("model.backend=cuda"))
    with pytest.raises(ImportError):
        BiMambaMixer(16, backend="cuda")


def test_torch_backend_trains_the_debug_model_in_seconds():
    torch.manual_seed(0)
    model = build_model(_debug())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.randn(4, 8, 1, 20, 24, 20), torch.randn(4, 1)
    losses = []
    for _ in range(15):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_the_logit_is_float32_under_bf16_autocast():
    """The head runs outside autocast: outputs a thousandth apart stay apart (a bf16 logit near 1 moves in steps of
    0.004 and tied a near-prior model's outputs); the logit is the fp32 head of the (autocast) features."""
    torch.manual_seed(0)
    model = build_model(_debug()).eval()
    x = torch.randn(3, 8, 1, 20, 24, 20)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, feats = model(x), model.forward_features(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, model.head(feats.float()))
    model.head.bias.data.fill_(0.83)
    model.head.weight.data.mul_(1e-3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.unique().numel() == 3


@pytest.mark.parametrize("batch", [1, 2])
def test_running_standardize_scales_a_near_constant_feature_to_unit_spread(batch):
    """A feature that is 1e-4 of a constant apart between scans comes out with mean 0 and sd 1 across scans, from
    batches of 1 or 2; evaluation uses the statistics without changing them."""
    from brainmt.models.layers import RunningStandardize

    torch.manual_seed(0)
    const = torch.randn(16) * 30
    norm = RunningStandardize(16).train()
    for _ in range(400):
        norm(const + 1e-4 * torch.randn(batch, 16))
    norm.eval()
    frozen = [b.clone() for b in norm.buffers()]
    out = norm(const + 1e-4 * torch.randn(2000, 16))
    assert out.mean(0).abs().max() < 0.3 and (out.std(0) - 1).abs().max() < 0.3
    assert all(torch.equal(a, b) for a, b in zip(frozen, norm.buffers(), strict=True))


def test_head_norm_running_gives_the_head_the_spread_across_scans():
    """The same weights, a class token made nearly the same for every scan (as the paper model's, 1e-4 of its norm
    apart): with ``head_norm: running`` the outputs differ across scans many times more than without."""
    torch.manual_seed(0)
    plain = build_model(_debug())
    plain.cls_token.data.mul_(1e4)
    standardised = build_model(_debug("model.head_norm=running"))
    standardised.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(8, 8, 1, 20, 24, 20)
    with torch.no_grad():
        for i in range(4):
            standardised.train()(x[2 * i:2 * i + 2])
        a, b = plain.eval()(x), standardised.eval()(x)
    assert b.std() > 100 * a.std() and b.std() > 0.01
