"""
The executable spec of umd. Run: python -m pytest -q test_all.py
Sections: schedules, masking, model, corruption/loss, then the data, training, sampling,
probe, FID and reliability tests. Numbers come from ../shared/spec/UMD_SPEC.md.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import UMD, ModelConfig, Block, random_masking, timestep_embedding, load_checkpoint
from corrupt import (make_schedule, q_sample, preset, umd_loss, pixel_mask, Knobs, T)


def micro(**kw):
    """A model small enough for unit tests: width 64, 2+1 blocks, 16x16 gray, patch 4 (L = 16)."""
    kw = {"image_size": 16, "channels": 1, **kw}
    torch.manual_seed(0)
    return UMD(ModelConfig.from_name("micro/4", **kw))


def perturb_zero_init(model, seed=0):
    """AdaLN-Zero gates start at 0, which blocks gradients and hides bugs: make them non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


# ---- schedules ---------------------------------------------------------------------------
def test_cosine_schedule_reference_values():
    abar = make_schedule("cosine")
    assert abar.dtype == torch.float64 and abar.shape == (T,)
    assert abar[0].item() == pytest.approx(0.99996, abs=5e-6)
    assert abar[50].item() == pytest.approx(0.99172, abs=5e-6)
    assert abar[999].item() == pytest.approx(2.4e-9, rel=0.05)
    assert (abar[1:] < abar[:-1]).all()


def test_cosine_betas_clipped_at_0999():
    abar = make_schedule("cosine")
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    assert betas.max().item() == pytest.approx(0.999, abs=1e-12)  # the last step hits the clip


def test_linear_schedule_endpoints():
    abar = make_schedule("linear")
    assert abar[0].item() == pytest.approx(1 - 1e-4, abs=1e-15)
    assert abar[1].item() == pytest.approx((1 - 1e-4) * (1 - (1e-4 + (0.02 - 1e-4) / 999)), abs=1e-15)
    assert abar[999].item() == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rel=1e-10)


def test_q_sample_closed_form():
    abar = make_schedule("cosine")
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    xt = q_sample(x0, t, eps, abar)
    for i in range(3):
        a = abar[t[i]].item()
        assert torch.allclose(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i], atol=1e-6)


def test_unknown_schedule_and_preset_are_errors():
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("sigmoid")
    with pytest.raises(ValueError, match="preset"):
        preset("simclr")
    with pytest.raises(ValueError, match="knob"):
        preset("umd", mask_ratio=0.5)


# ---- masking -----------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,kept", [(0.75, 64), (0.375, 160), (0.5, 128)])
def test_masking_keeps_int_L_times_1_minus_r(ratio, kept):
    x = torch.randn(5, 256, 8)
    x_kept, mask, ids_restore = random_masking(x, ratio)
    assert x_kept.shape == (5, kept, 8)
    assert (mask.sum(1) == 256 - kept).all()
    # ids_restore inverts the shuffle: putting kept tokens back lands them where mask == 0
    full = torch.cat([x_kept, torch.zeros(5, 256 - kept, 8)], 1)
    restored = torch.gather(full, 1, ids_restore[:, :, None].expand(-1, -1, 8))
    keep = mask == 0
    assert torch.equal(restored[keep], x[keep])
    assert (restored[~keep] == 0).all()


def test_given_mask_is_used_and_validated():
    x = torch.randn(2, 16, 4)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :12] = True
    mask[1, 4:] = True
    x_kept, out_mask, _ = random_masking(x, 0.0, mask)
    assert torch.equal(out_mask.bool(), mask)
    assert torch.equal(x_kept[0], x[0, 12:]) and torch.equal(x_kept[1], x[1, :4])
    mask[1, 0] = True
    with pytest.raises(ValueError, match="same number"):
        random_masking(x, 0.0, mask)


# ---- model -------------------------------------------------------------------------------
def test_variant_names_and_bad_names():
    c = ModelConfig.from_name("B/4")
    assert (c.width, c.depth, c.dec_depth, c.heads, c.patch_size) == (768, 12, 4, 12, 4)
    c = ModelConfig.from_name("L/2")
    assert (c.width, c.depth, c.dec_depth, c.heads, c.patch_size) == (1024, 24, 8, 16, 2)
    for bad in ("B", "X/4", "B/x"):
        with pytest.raises(ValueError, match="variant"):
            ModelConfig.from_name(bad)


def test_B4_parameter_count_at_64px():
    # The number stated in the README (without a label table; fine-tuning on 1000 classes
    # adds 1001*768 + 2*(768*1536) + 1536 + 768 = 3,130,368).
    model = UMD(ModelConfig.from_name("B/4", image_size=64, channels=3))
    assert model.num_params() == 174_157_152
    model.add_label_embedding(1000)
    assert model.num_params() == 174_157_152 + 3_130_368


def test_timestep_embedding_formula():
    emb = timestep_embedding(torch.tensor([0, 7]), 8)
    freqs = [math.exp(-i * math.log(10000) / 3) for i in range(4)]
    expect = [math.sin(7 * f) for f in freqs] + [math.cos(7 * f) for f in freqs]
    assert torch.allclose(emb[1], torch.tensor(expect), atol=1e-6)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # sin first


def test_init_blocks_are_identity_and_final_modulation_zero():
    model = micro()
    x, cond = torch.randn(3, 7, 64), torch.randn(3, 64)
    for block in [*model.encoder, *model.decoder]:
        assert torch.equal(block(x, cond), x)
    assert (model.final_modulation(cond) == 0).all()
    assert (model.cls_tokens == 0).all()
    # per-chunk xavier on the fused qkv: each (D, D) chunk has the xavier bound sqrt(6/(2D))
    bound = math.sqrt(6 / 128)
    for w in model.encoder[0].attn.qkv.weight.chunk(3):
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert model.pos_enc.std().item() == pytest.approx(16 ** -0.5, rel=0.1)
    assert model.mask_token.std().item() == pytest.approx(0.02, rel=0.5)


def test_output_is_2C_channels_x0_then_eps():
    model = micro(channels=3)
    p, C = 4, 3
    with torch.no_grad():  # head emits its bias only: channel k of every pixel reads k
        model.head.weight.zero_()
        model.head.bias.copy_(torch.arange(2 * C).float().repeat(p * p))
    x0, eps, mask = model(torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
    assert x0.shape == eps.shape == (2, 3, 16, 16) and mask is None
    for k in range(C):
        assert (x0[:, k] == k).all() and (eps[:, k] == C + k).all()


def test_unpatchify_places_tokens_row_major():
    model = micro()
    tokens = torch.arange(16).float()[None, :, None].expand(1, 16, 4 * 4 * 2)
    img = model.unpatchify(tokens)
    assert img.shape == (1, 2, 16, 16)
    assert img[0, 0, 0, 4].item() == 1 and img[0, 0, 4, 0].item() == 4 and img[0, 1, 15, 15].item() == 15


def test_any_channel_count_and_size_divisible_by_patch():
    for channels, size in ((4, 8), (1, 24), (3, 12)):
        torch.manual_seed(0)
        model = UMD(ModelConfig.from_name("micro/4", image_size=size, channels=channels))
        x0, eps, mask = model(torch.randn(2, channels, size, size), torch.tensor([0, 5]), mask_ratio=0.5)
        assert x0.shape == eps.shape == (2, channels, size, size)
        assert mask.shape == (2, (size // 4) ** 2)


def test_representation_is_mean_of_cls_and_batch_independent():
    model = perturb_zero_init(micro()).eval()
    x = torch.randn(6, 1, 16, 16)
    rep = model.representation(x)
    assert rep.shape == (6, 64)
    assert torch.allclose(rep[2:4], model.representation(x[2:4]), atol=1e-5)
    cond = model.condition(torch.zeros(6, dtype=torch.long), None)
    tokens = torch.cat([model.cls_tokens.expand(6, -1, -1), model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_enc], 1)
    for block in model.encoder:
        tokens = block(tokens, cond)
    assert torch.allclose(rep, model.enc_norm(tokens)[:, :4].mean(1), atol=1e-5)


def test_no_adaln_variant_uses_a_cond_token():
    model = perturb_zero_init(micro(adaln=False))
    assert model.final_modulation is None and model.encoder[0].adaLN_modulation is None
    block, x = model.encoder[0], torch.randn(2, 5, 64)
    out_a, out_b = block(x, torch.randn(2, 64)), block(x, torch.randn(2, 64))
    assert out_a.shape == x.shape and not torch.allclose(out_a, out_b)
    # the cond token takes part in attention exactly like a prepended token
    cond = torch.randn(2, 64)
    seq = torch.cat([cond[:, None], x], 1)
    seq = seq + block.attn(block.norm1(seq))
    seq = seq + block.mlp(block.norm2(seq))
    assert torch.allclose(block(x, cond), seq[:, 1:], atol=1e-6)


def test_guided_forward_at_scale_1_equals_conditional_and_0_unconditional():
    model = perturb_zero_init(micro(num_classes=10)).eval()
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([1, 50, 500, 1000]), torch.tensor([0, 3, 9, 2])
    with torch.no_grad():
        x0_c, eps_c, _ = model(x, t, y)
        x0_u, eps_u, _ = model(x, t, model.null_labels(4, "cpu"))
        x0_g, eps_g = model.forward_with_cfg(x, t, y, 1.0)
        assert torch.allclose(x0_g, x0_c, atol=1e-5) and torch.allclose(eps_g, eps_c, atol=1e-5)
        x0_g, eps_g = model.forward_with_cfg(x, t, y, 0.0)
        assert torch.allclose(x0_g, x0_u, atol=1e-5) and torch.allclose(eps_g, eps_u, atol=1e-5)
        x0_g, _ = model.forward_with_cfg(x, t, y, 4.0)
        assert torch.allclose(x0_g, x0_u + 4.0 * (x0_c - x0_u), atol=1e-4)
    assert not torch.allclose(x0_c, x0_u)


def test_label_dropout_10_percent_in_training_none_in_eval():
    model = micro(num_classes=10)
    seen = []
    model.label_embed.table.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    y = torch.randint(0, 10, (4000,))
    model.train()
    model.condition(torch.zeros(4000, dtype=torch.long), y)
    dropped = (seen[-1] == 10).float().mean().item()
    assert 0.08 < dropped < 0.12
    assert torch.equal(seen[-1][seen[-1] != 10], y[seen[-1] != 10])
    model.eval()
    model.condition(torch.zeros(4000, dtype=torch.long), y)
    assert torch.equal(seen[-1], y)


def test_add_label_embedding_to_a_pretrained_model():
    model = micro()
    assert model.label_embed is None
    with pytest.raises(ValueError, match="without a label table"):
        model(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long), torch.tensor([0, 1]))
    before = model.num_params()
    model.add_label_embedding(10)
    assert model.config.num_classes == 10 and model.num_params() == before + 11 * 64 + 64 * 128 * 2 + 128 + 64
    x0, _, _ = model(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long), torch.tensor([0, 9]))
    assert x0.shape == (2, 1, 16, 16)


def test_bad_model_inputs_raise_clear_errors():
    model = micro(num_classes=10)
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        model(torch.randn(2, 3, 16, 16), t)
    with pytest.raises(ValueError, match="not divisible"):
        UMD(ModelConfig.from_name("micro/4", image_size=18))
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            model(torch.randn(2, 1, 16, 16), t, mask_ratio=ratio)
    with pytest.raises(ValueError, match="keeps no token"):
        model(torch.randn(2, 1, 16, 16), t, mask_ratio=0.99)
    for y in ([0, 11], [-1, 0]):
        with pytest.raises(ValueError, match=r"labels must be in \[0, 10\]"):
            model(torch.randn(2, 1, 16, 16), t, torch.tensor(y))


# ---- corruption and loss -----------------------------------------------------------------
def explicit_pixel_mask(mask, p, size):
    """Token mask -> pixel mask by plain loops, independent of corrupt.pixel_mask."""
    out = torch.zeros(mask.shape[0], 1, size, size)
    per_row = size // p
    for n in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            if mask[n, j]:
                r, c = divmod(j, per_row)
                out[n, 0, r * p:(r + 1) * p, c * p:(c + 1) * p] = 1
    return out


def mean_over(err, pix):
    """Mean of err over the positions where pix == 1 (numpy, as a hand computation)."""
    e, m = err.detach().numpy(), np.broadcast_to(pix.numpy(), err.shape)
    return float(e[m == 1].mean())


def fixed_masks(n, L, masked, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, L, dtype=torch.bool)
    for i in range(n):
        mask[i, torch.randperm(L, generator=g)[:masked]] = True
    return mask


@pytest.mark.parametrize("mask_ratio_noisy", [0.375, 0.0])
def test_umd_loss_equals_hand_computation(mask_ratio_noisy):
    model = perturb_zero_init(micro()).eval()
    abar = make_schedule("cosine")
    B, n_clean = 8, 4  # r = 0.5: first 4 noisy, last 4 clean
    torch.manual_seed(1)
    x0 = torch.randn(B, 1, 16, 16)
    t, eps = torch.tensor([0, 10, 500, 999]), torch.randn(4, 1, 16, 16)
    noisy_mask = fixed_masks(4, 16, int(16 * mask_ratio_noisy), 2) if mask_ratio_noisy else None
    clean_mask = fixed_masks(4, 16, 12, 3)
    knobs = preset("umd", mask_ratio_noisy=mask_ratio_noisy)
    loss, parts = umd_loss(model, x0, None, abar, knobs, t=t, eps=eps, masks=(noisy_mask, clean_mask))

    # by hand: x_t from the float64 closed form, the same fixed masks, plain means
    a = abar[t].view(-1, 1, 1, 1)
    xt = (a.sqrt() * x0[:4].double() + (1 - a).sqrt() * eps.double()).float()
    x0_pred, eps_pred, _ = model(xt, t + 1, None, mask=noisy_mask)
    if noisy_mask is None:
        eps_loss = float(((eps_pred - eps) ** 2).mean().detach())
        x0_loss = float(((x0_pred - x0[:4]) ** 2).mean().detach())
    else:
        pix = explicit_pixel_mask(noisy_mask, 4, 16)
        eps_loss = mean_over((eps_pred - eps) ** 2, 1 - pix)
        x0_loss = mean_over((x0_pred - x0[:4]) ** 2, pix)
    x0_pred_c, _, _ = model(x0[4:], torch.zeros(4, dtype=torch.long), None, mask=clean_mask)
    clean_loss = mean_over((x0_pred_c - x0[4:]) ** 2, explicit_pixel_mask(clean_mask, 4, 16))
    expect = (eps_loss + x0_loss) / 2 * 0.5 + clean_loss * 0.5
    assert parts["noisy_eps_loss"].item() == pytest.approx(eps_loss, rel=1e-5)
    assert parts["noisy_x0_loss"].item() == pytest.approx(x0_loss, rel=1e-5)
    assert parts["clean_loss"].item() == pytest.approx(clean_loss, rel=1e-5)
    assert loss.item() == pytest.approx(expect, rel=1e-5)


def test_branch_weights_follow_batch_share_and_ablation_targets():
    model = perturb_zero_init(micro()).eval()
    abar = make_schedule("cosine")
    x0 = torch.randn(10, 1, 16, 16)
    t, eps = torch.randint(0, T, (8,)), torch.randn(8, 1, 16, 16)
    masks = (fixed_masks(8, 16, 6, 0), fixed_masks(2, 16, 12, 1))
    for target in ("both", "x0", "eps"):
        knobs = preset("umd", no_noise_prob=0.2, noisy_target=target)  # n_clean = int(10 * 0.2) = 2
        loss, p = umd_loss(model, x0, None, abar, knobs, t=t, eps=eps, masks=masks)
        noisy = {"both": (p["noisy_eps_loss"] + p["noisy_x0_loss"]) / 2,
                 "x0": p["noisy_x0_loss"], "eps": p["noisy_eps_loss"]}[target]
        assert loss.item() == pytest.approx((noisy * 0.8 + p["clean_loss"] * 0.2).item(), rel=1e-6)


def record_calls(model):
    calls = []
    forward = model.forward

    def spy(x, t_model, y=None, mask_ratio=0.0, mask=None):
        calls.append((x.shape[0], t_model.clone(), mask_ratio))
        return forward(x, t_model, y, mask_ratio, mask)
    model.forward = spy
    return calls


def test_presets_run_the_branches_they_should():
    abar = make_schedule("cosine")
    x0 = torch.randn(8, 1, 16, 16)
    expected = {  # preset -> [(batch, clean?, mask ratio)] in call order
        "umd": [(4, False, 0.375), (4, True, 0.75)],
        "mae": [(8, True, 0.75)],
        "dit": [(8, False, 0.0)],
        "maskdit": [(8, False, 0.5)],
        "umd_finetune": [(8, False, 0.0)],  # int(8 * 0.05) = 0 clean samples at this batch size
    }
    for name, want in expected.items():
        knobs = preset(name)
        model = micro(adaln=knobs.adaln)
        calls = record_calls(model)
        loss, parts = umd_loss(model, x0, None, abar, knobs)
        got = [(n, bool((t == 0).all()), r) for n, t, r in calls]
        assert got == want, name
        for n, t, r in calls:  # noisy samples get t_model = t + 1 in [1, T]
            assert (t == 0).all() or ((t >= 1) & (t <= T)).all()
        if name == "mae":
            assert parts["noisy_eps_loss"] == 0 and parts["noisy_x0_loss"] == 0
        if name == "dit":
            assert parts["clean_loss"] == 0
    assert preset("mae").adaln is False and preset("umd_finetune").no_noise_prob == 0.05
    assert int(256 * preset("umd_finetune").no_noise_prob) == 12


@pytest.mark.parametrize("name", ["umd", "mae", "dit", "maskdit", "umd_finetune"])
def test_gradients_reach_every_trainable_parameter(name):
    knobs = preset(name)
    labels = name == "umd_finetune"
    model = perturb_zero_init(micro(adaln=knobs.adaln, num_classes=10 if labels else 0)).train()
    x0 = torch.randn(40, 1, 16, 16)
    y = torch.randint(0, 10, (40,)) if labels else None
    loss, _ = umd_loss(model, x0, y, make_schedule("cosine"), knobs)
    loss.backward()
    masks_something = knobs.mask_ratio_noisy > 0 or knobs.no_noise_prob > 0
    for pname, p in model.named_parameters():
        if pname == "mask_token" and not masks_something:
            assert p.grad is None  # no masked token anywhere: the mask token is unused
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"


def test_knobs_validation():
    with pytest.raises(ValueError, match="mask_ratio_clean must be > 0"):
        Knobs(no_noise_prob=0.5, mask_ratio_clean=0.0)
    with pytest.raises(ValueError, match=r"mask_ratio_noisy must be in \[0, 1\)"):
        Knobs(mask_ratio_noisy=1.0)
    with pytest.raises(ValueError, match="no_noise_prob"):
        Knobs(no_noise_prob=1.5)
    with pytest.raises(ValueError, match="noisy_target"):
        Knobs(noisy_target="v")


def test_pixel_mask_matches_explicit_loops():
    mask = fixed_masks(3, 16, 5, 7)
    assert torch.equal(pixel_mask(mask.float(), 4), explicit_pixel_mask(mask, 4, 16))


def test_forward_flops_match_counted_matmuls():
    from torch.utils.flop_counter import FlopCounterMode
    for adaln, ratio, classes in ((True, 0.0, 0), (True, 0.5, 10), (False, 0.75, 0)):
        model = micro(channels=3, adaln=adaln, num_classes=classes).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, 16, 16), torch.zeros(1, dtype=torch.long), mask_ratio=ratio)
        counted = sum(counter.get_flop_counts()["Global"].values())  # linear layers + conv
        kept, extra = int(16 * (1 - ratio)), 0 if adaln else 1
        attention = sum(4 * n * n * 64 for n in [kept + 4 + extra] * 2 + [17 + extra])  # QK^T, AV
        assert model.forward_flops(ratio) == counted + attention


def test_umd_over_dit_flops_is_058_for_B4_at_64px():
    from corrupt import train_flops_per_image
    model = UMD(ModelConfig.from_name("B/4", image_size=64))
    ratio = train_flops_per_image(model, preset("umd")) / train_flops_per_image(model, preset("dit"))
    assert ratio == pytest.approx(0.58, abs=0.005)
