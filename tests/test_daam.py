"""DAAM capture on the tiny SDXL UNet: unchanged output, DAAM's aggregation, spans, CFG halves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iosd.errors import UserError
from iosd.pipeline.daam import DAAM_THRESHOLD, DaamRecorder, daam_masks
from iosd.pipeline.tiny import TINY_UNET_CONFIG, tiny_unet

LATENT = (32, 32)
TOKENS = 77


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=0)


def _inputs(batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    dim = TINY_UNET_CONFIG["cross_attention_dim"]
    return {
        "sample": torch.randn(batch, TINY_UNET_CONFIG["in_channels"], *LATENT, generator=g),
        "encoder_hidden_states": torch.randn(batch, TOKENS, dim, generator=g),
        "added_cond_kwargs": {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.randn(batch, 6, generator=g)},
    }


def _run(unet, inputs: dict, t: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return unet(inputs["sample"], t, encoder_hidden_states=inputs["encoder_hidden_states"], added_cond_kwargs=inputs["added_cond_kwargs"]).sample


def _heat(unet, inputs: dict, spans, out_size: int = 32, **kw) -> list[np.ndarray]:
    with DaamRecorder(unet, LATENT, **kw) as rec:
        _run(unet, inputs)
        return rec.heat_maps(spans, out_size)


def test_output_is_unchanged_by_the_recorder(unet):
    inputs = _inputs(2)
    plain = _run(unet, inputs)
    with DaamRecorder(unet, LATENT) as rec:
        recorded = _run(unet, inputs)
        assert rec.calls > 0
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=0)


def test_processors_are_restored_even_after_an_error(unet):
    before = dict(unet.attn_processors)
    with DaamRecorder(unet, LATENT):
        during = unet.attn_processors
        swapped = [k for k in before if during[k] is not before[k]]
        assert swapped and all(k.endswith("attn2.processor") and not k.startswith("mid_block") for k in swapped)
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(KeyError), DaamRecorder(unet, LATENT):
        raise KeyError("boom")
    assert all(unet.attn_processors[k] is v for k, v in before.items())


def test_mid_block_is_left_out_unless_asked(unet):
    assert not any(k.startswith("mid_block") for k in DaamRecorder(unet, LATENT).layer_names())
    assert any(k.startswith("mid_block") for k in DaamRecorder(unet, LATENT, include_mid=True).layer_names())


def test_shapes_and_range(unet):
    spans = [[(1, 2), (3, 6)], [(4, 5)], []]
    heats = _heat(unet, _inputs(3), spans, out_size=16)
    assert [h.shape for h in heats] == [(2, 16, 16), (1, 16, 16), (0, 16, 16)]
    for h in heats[:2]:
        assert h.dtype == np.float32
        assert h.min() >= 0 and np.allclose(h.max(axis=(1, 2)), 1.0) and np.allclose(h.min(axis=(1, 2)), 0.0)


def _reference_daam(unet, inputs: dict, include_mid: bool = False) -> torch.Tensor:
    """DAAM as castorini/daam computes it: classic attention scores per (layer, head), each map
    bicubic-upsampled to the latent size and clamped, then the mean over (layer, head)."""
    per_head: list[torch.Tensor] = []
    handles = []

    def hook(attn, args, kwargs):
        hidden, context = args[0], kwargs["encoder_hidden_states"]
        q = attn.head_to_batch_dim(attn.to_q(hidden))
        k = attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(q, k, None)  # (B*heads, hw, tokens)
        b = hidden.shape[0]
        side = int(round(probs.shape[1] ** 0.5))
        maps = probs.view(b, attn.heads, side, side, -1).permute(1, 0, 4, 2, 3)  # heads, B, T, h, w
        for head in maps:
            up = F.interpolate(head, size=LATENT, mode="bicubic").clamp(min=0)
            per_head.append(up)

    for name, module in unet.named_modules():
        if name.endswith("attn2") and (include_mid or not name.startswith("mid_block")):
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        _run(unet, inputs)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(per_head).mean(0)  # (B, T, H, W)


def _norm(m: torch.Tensor) -> torch.Tensor:
    return (m - m.min()) / (m.max() - m.min())


def test_matches_an_independent_daam_computation(unet):
    inputs = _inputs(2, seed=3)
    ref = _reference_daam(unet, inputs)
    spans = [[(1, 2), (2, 5)], [(7, 9)]]
    heats = _heat(unet, inputs, spans)
    for b, item in enumerate(spans):
        for i, (s, e) in enumerate(item):
            expected = _norm(ref[b, s:e].mean(0)).numpy()
            # DAAM clamps bicubic undershoot per (layer, head), we per resolution: ~equal here
            assert np.abs(heats[b][i] - expected).max() < 1e-4


def test_token_maps_are_sums_over_steps_and_reset_forgets(unet):
    inputs = _inputs(1)
    with DaamRecorder(unet, LATENT) as rec:
        _run(unet, inputs, t=900)
        first = rec.token_maps(1).clone()
        rec.reset()
        _run(unet, inputs, t=100)
        second = rec.token_maps(1).clone()
        rec.reset()
        _run(unet, inputs, t=900)
        _run(unet, inputs, t=100)
        both = rec.token_maps(1)
        rec.reset()
        rec.armed = False
        _run(unet, inputs)
        assert rec.calls == 0
        with pytest.raises(RuntimeError, match="no cross-attention"):
            rec.heat_maps([[(1, 2)]], 8)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(both, first + second, atol=1e-5, rtol=1e-5)


def test_a_distinctive_token_embedding_changes_its_map(unet):
    base = _inputs(1, seed=5)
    loud = _inputs(1, seed=5)
    g = torch.Generator().manual_seed(9)
    loud["encoder_hidden_states"][0, 6] = 40 * torch.randn(TINY_UNET_CONFIG["cross_attention_dim"], generator=g)
    with DaamRecorder(unet, LATENT) as rec:
        _run(unet, base)
        quiet_maps = rec.token_maps(1)[0].clone()
        rec.reset()
        _run(unet, loud)
        loud_maps = rec.token_maps(1)[0]
    # its share of the attention jumps, and it is the only token whose share grows
    gain = loud_maps.mean(dim=(1, 2)) / quiet_maps.mean(dim=(1, 2))
    assert gain[6] > 5 and int(gain.argmax()) == 6
    assert (torch.cat([gain[:6], gain[7:]]) < 1).all()
    h_quiet = _heat(unet, base, [[(6, 7)]])[0]
    h_loud = _heat(unet, loud, [[(6, 7)]])[0]
    assert np.abs(h_loud[0] - h_quiet[0]).mean() > 0.1


def test_a_span_averages_its_tokens(unet):
    inputs = _inputs(1, seed=7)
    with DaamRecorder(unet, LATENT) as rec:
        _run(unet, inputs)
        maps = rec.token_maps(1)[0]
        span, first, last = rec.heat_maps([[(2, 5), (2, 3), (4, 5)]], 32)[0]
    expected = _norm(maps[2:5].mean(0)).numpy()
    np.testing.assert_allclose(span, expected, atol=1e-5)
    assert np.abs(span - first).max() > 1e-2 and np.abs(span - last).max() > 1e-2


def test_guidance_batch_uses_the_conditional_half(unet):
    cond = _inputs(2, seed=11)
    uncond = _inputs(2, seed=12)
    guided = {
        "sample": torch.cat([cond["sample"], cond["sample"]]),
        "encoder_hidden_states": torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]]),
        "added_cond_kwargs": {k: torch.cat([uncond["added_cond_kwargs"][k], cond["added_cond_kwargs"][k]]) for k in cond["added_cond_kwargs"]},
    }
    spans = [[(1, 3)], [(4, 6)]]
    alone = _heat(unet, cond, spans)
    with_cfg = _heat(unet, guided, spans)
    only_uncond = _heat(unet, uncond, spans)
    for a, b, u in zip(alone, with_cfg, only_uncond, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-4)
        assert np.abs(u - a).max() > 0.1


def test_bad_batch_and_spans_are_refused(unet):
    with DaamRecorder(unet, LATENT) as rec:
        _run(unet, _inputs(3))
        with pytest.raises(RuntimeError, match="batch of 3"):
            rec.heat_maps([[(1, 2)]] * 2, 8)
        with pytest.raises(ValueError, match="not inside"):
            rec.heat_maps([[(1, 2)], [(5, 5)], [(1, 2)]], 8)
        with pytest.raises(ValueError, match="not inside"):
            rec.heat_maps([[(1, 2)], [(70, 80)], [(1, 2)]], 8)
        with pytest.raises(RuntimeError, match="reset"):
            _run(unet, _inputs(2))


def test_unknown_attention_processors_are_refused(unet):
    class Custom:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kw):
            raise AssertionError("never called")

    before = dict(unet.attn_processors)
    odd = dict(before)
    key = next(k for k in odd if k.endswith("attn2.processor"))
    odd[key] = Custom()
    unet.set_attn_processor(odd)
    try:
        with pytest.raises(UserError, match="Custom"), DaamRecorder(unet, LATENT):
            pass
    finally:
        unet.set_attn_processor(dict(before))


def test_daam_masks_threshold_the_upsampled_normalised_map():
    heat = np.zeros((2, 4, 4), np.float16)
    heat[0, 1:3, 1:3] = 1.0
    heat[1] = np.linspace(0, 1, 16).reshape(4, 4)
    same = daam_masks(heat, 4)
    assert same.dtype == bool and same.shape == (2, 4, 4)
    np.testing.assert_array_equal(same[0], heat[0] > 0.5)
    np.testing.assert_array_equal(same[1], heat[1].astype(np.float32) > DAAM_THRESHOLD)
    big = daam_masks(heat, 16)
    assert big.shape == (2, 16, 16)
    assert big[0, 6:10, 6:10].all() and not big[0, 0].any() and not big[0, :, 0].any()
    frac = big[1].mean()
    assert 0.5 < frac < 0.7  # linear ramp above 0.4 of its range: ~60 % of the pixels
    assert daam_masks(heat[1], 16, threshold=0.9).sum() < big[1].sum()
    assert daam_masks(heat[1], 16).shape == (16, 16)
    assert not daam_masks(np.ones((1, 4, 4)), 8).any()  # flat map: no evidence, empty mask
    assert daam_masks(np.zeros((0, 4, 4)), 8).shape == (0, 8, 8)
