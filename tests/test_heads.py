"""The lite grounding heads and the mask loss: shapes, per-image independence, padding, round trip, fitting."""

from __future__ import annotations

import json

import pytest
import torch

from iosd.errors import UserError
from iosd.train.heads import build_head
from iosd.train.losses import mask_loss

KINDS = ("gd-lite", "iosd-lite")
SMALL = {"d_model": 64, "heads": 4, "ffn": 128}
LAYOUTS = {
    "one_group": {"layers": [["up_blocks.2.resnets.2", [16, 16, 16]]], "embedding_dim": 24},
    "two_groups": {"layers": [["mid_block", [48, 8, 8]], ["up_blocks.0", [32, 16, 16]], ["up_blocks.1", [16, 16, 16]]], "embedding_dim": 24},
    "three_groups": {"layers": [["p1", [64, 8, 8]], ["p2", [64, 16, 16]], ["p3", [32, 32, 32]]], "embedding_dim": 64},
}


def random_inputs(layout: dict, batch: int, queries: int, seed: int = 0) -> tuple[dict, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features = {path: torch.randn(batch, *shape, generator=gen) for path, shape in layout["layers"]}
    return features, torch.randn(batch, queries, layout["embedding_dim"], generator=gen)


def head_for(kind: str, layout: dict, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_head(kind, layout, **{**SMALL, **options}).eval()


def take(features: dict, index: int) -> dict:
    return {path: value[index : index + 1] for path, value in features.items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_output_shape_follows_the_largest_side(kind, name):
    layout = LAYOUTS[name]
    head = head_for(kind, layout)
    features, queries = random_inputs(layout, batch=2, queries=3)
    side = max(shape[-1] for _, shape in layout["layers"])
    assert head.config["mask_size"] == side
    logits = head(features, queries)
    assert logits.shape == (2, 3, side, side)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", KINDS)
def test_mask_size_override(kind):
    layout = LAYOUTS["two_groups"]
    head = head_for(kind, layout, mask_size=40)
    features, queries = random_inputs(layout, batch=2, queries=1)
    assert head(features, queries).shape == (2, 1, 40, 40)


def test_architectures_differ_as_in_the_papers():
    layout = LAYOUTS["three_groups"]
    gd, iosd = build_head("gd-lite", layout), build_head("iosd-lite", layout)
    assert gd.config["d_model"] == 512 and gd.config["heads"] == 8 and gd.config["ffn"] == 2048
    assert len(gd.decoder) == 3  # GD: three decoder layers over one visual map
    assert len(iosd.decoder) == 4  # IOSD: one layer per level: 8, 16, 32 and the final map
    assert gd.config["visual_channels"] == [16, 32, 64]  # GD's 1x1 widths: twice the side
    sd1 = {"layers": [[f"l{s}", [8, s, s]] for s in (8, 16, 32, 64)], "embedding_dim": 8}
    assert sum(build_head("gd-lite", sd1, **SMALL).config["visual_channels"]) == 240
    assert build_head("gd-lite", layout, layers=2).config["layers"] == 2


def test_gd_tokens_match_the_published_patching():
    sd1 = {"layers": [[f"l{s}", [8, s, s]] for s in (8, 16, 32, 64)], "embedding_dim": 8}
    head = build_head("gd-lite", sd1, **SMALL)
    assert (head.tokens.patch, head.tokens.grid) == (4, 16)  # 4x4 patches of 64x64: 256 tokens


@pytest.mark.parametrize("kind", KINDS)
def test_an_image_does_not_depend_on_its_batch_mates(kind):
    layout = LAYOUTS["three_groups"]
    head = head_for(kind, layout)
    features, queries = random_inputs(layout, batch=3, queries=2)
    with torch.no_grad():
        batched = head(features, queries)
        for i in range(3):
            alone = head(take(features, i), queries[i : i + 1])
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_padded_queries_change_nothing(kind):
    layout = LAYOUTS["two_groups"]
    head = head_for(kind, layout)
    features, queries = random_inputs(layout, batch=2, queries=3)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    with torch.no_grad():
        batched = head(features, queries, mask)
        queries_other_padding = queries.clone()
        queries_other_padding[1, 1:] = 100.0
        repadded = head(features, queries_other_padding, mask)
        alone0 = head(take(features, 0), queries[:1])
        alone1 = head(take(features, 1), queries[1:2, :1])
    torch.testing.assert_close(batched[0], alone0[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched[1, :1], alone1[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(repadded[1, :1], batched[1, :1], atol=1e-5, rtol=1e-4)
    assert (batched[1, 1:] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_an_image_without_real_queries_gives_no_nan(kind):
    layout = LAYOUTS["one_group"]
    head = head_for(kind, layout).train()
    features, queries = random_inputs(layout, batch=2, queries=2)
    mask = torch.tensor([[True, False], [False, False]])
    logits = head(features, queries, mask)
    assert torch.isfinite(logits).all()
    mask_loss(logits, torch.ones_like(logits), mask).backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trip_rebuilds_the_same_network(kind):
    layout = LAYOUTS["three_groups"]
    head = head_for(kind, layout, mask_size=48, dropout=0.1)
    config = json.loads(json.dumps(head.config))
    rebuilt = build_head(**config).eval()
    rebuilt.load_state_dict(head.state_dict(), strict=True)
    assert rebuilt.config == head.config
    features, queries = random_inputs(layout, batch=2, queries=2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(features, queries), head(features, queries))


def test_bad_requests_are_user_errors():
    layout = LAYOUTS["two_groups"]
    with pytest.raises(UserError, match="unknown head kind"):
        build_head("unet", layout)
    with pytest.raises(UserError, match="unknown head option"):
        build_head("gd-lite", layout, depth=3)
    with pytest.raises(UserError, match="one fusion layer per pyramid level"):
        build_head("iosd-lite", layout, layers=5)
    with pytest.raises(UserError, match="not divisible"):
        build_head("gd-lite", layout, d_model=100, heads=8)
    with pytest.raises(UserError, match="visual_channels needs 2"):
        build_head("gd-lite", layout, visual_channels=[8, 8, 8])
    with pytest.raises(UserError, match="malformed feature layout"):
        build_head("gd-lite", {"layers": [["a", 3]]})
    with pytest.raises(UserError, match="square"):
        build_head("gd-lite", {"layers": [["a", [4, 8, 16]]], "embedding_dim": 4})
    head = head_for("gd-lite", layout)
    features, queries = random_inputs(layout, batch=2, queries=1)
    with pytest.raises(UserError, match="is missing"):
        head({k: v for k, v in features.items() if k != "mid_block"}, queries)
    with pytest.raises(UserError, match="expected"):
        head(take(features, 0), queries)
    with pytest.raises(UserError, match="expected"):
        head(features, queries[..., :5])


def test_loss_ignores_invalid_queries():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=gen)
    targets = (torch.rand(2, 3, 8, 8, generator=gen) > 0.5).float()
    valid = torch.tensor([[True, False, True], [False, True, False]])
    loss = mask_loss(logits, targets, valid)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[valid], targets[valid])
    torch.testing.assert_close(loss, expected)
    garbage = logits.clone()
    garbage[~valid] = float("nan")
    torch.testing.assert_close(mask_loss(garbage, targets, valid, dice_weight=0.5), mask_loss(logits, targets, valid, dice_weight=0.5))
    assert mask_loss(logits, targets, valid, dice_weight=1.0) > loss


def test_loss_with_nothing_valid_is_zero_and_backpropagates():
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    loss = mask_loss(logits, torch.ones(2, 2, 4, 4), torch.zeros(2, 2, dtype=torch.bool), dice_weight=1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_dice_rewards_overlap():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    right = torch.where(target > 0, 10.0, -10.0)
    assert mask_loss(right, target, torch.ones(1, 1, dtype=torch.bool), dice_weight=1.0) < 0.01
    assert mask_loss(-right, target, torch.ones(1, 1, dtype=torch.bool), dice_weight=1.0) > 1.0
    with pytest.raises(UserError, match="differ"):
        mask_loss(right, target[..., :4], torch.ones(1, 1, dtype=torch.bool))


def grounding_examples(layout: dict, images: int = 4, classes: int = 3) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Two boxes of two classes per image; each class leaves its own channel signature in the features."""
    gen = torch.Generator().manual_seed(1)
    side = max(shape[-1] for _, shape in layout["layers"])
    embeddings = torch.randn(classes, layout["embedding_dim"], generator=gen)
    signatures = {path: torch.randn(classes, shape[0], generator=gen) for path, shape in layout["layers"]}
    queries, targets = [], []
    features = {path: 0.3 * torch.randn(images, *shape, generator=gen) for path, shape in layout["layers"]}
    for n in range(images):
        picked = torch.randperm(classes, generator=gen)[:2]
        masks = torch.zeros(2, side, side)
        for j, cls in enumerate(picked.tolist()):
            y, x = torch.randint(0, side // 2, (2,), generator=gen).tolist()
            h, w = torch.randint(side // 4, side // 2, (2,), generator=gen).tolist()
            masks[j, y : y + h, x : x + w] = 1
            masks[j] *= 1 - masks[:j].sum(0).clamp(max=1)  # the later box stays behind the first
            for path, shape in layout["layers"]:
                small = torch.nn.functional.adaptive_avg_pool2d(masks[j : j + 1], shape[-1])[0]
                features[path][n] += signatures[path][cls][:, None, None] * small
        queries.append(embeddings[picked])
        targets.append(masks)
    return features, torch.stack(queries), torch.stack(targets)


def mean_iou(logits: torch.Tensor, targets: torch.Tensor) -> float:
    pred, truth = logits > 0, targets > 0.5
    inter = (pred & truth).flatten(2).sum(-1).float()
    union = (pred | truth).flatten(2).sum(-1).float()
    return (inter / union.clamp(min=1)).mean().item()


@pytest.mark.parametrize("kind", KINDS)
def test_head_fits_a_few_grounding_examples(kind):
    layout = LAYOUTS["three_groups"]
    features, queries, targets = grounding_examples(layout)
    head = head_for(kind, layout).train()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    valid = torch.ones(queries.shape[:2], dtype=torch.bool)
    iou = 0.0
    for step in range(300):
        logits = head(features, queries, valid)
        loss = mask_loss(logits, targets, valid, dice_weight=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9:
            iou = mean_iou(logits.detach(), targets)
            if iou > 0.95:
                break
    with torch.no_grad():
        assert mean_iou(head.eval()(features, queries), targets) > 0.9, (step, iou)
