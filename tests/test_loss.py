"""Matcher, focal/L1/GIoU losses, the set criterion, and a tiny model learning a fixed batch."""

from __future__ import annotations

import functools
import itertools
import math

import model_helpers
import pytest
import torch
import torch.distributed as dist
import torchvision
from model_helpers import one_thread as one_thread  # autouse: one intra-op thread

from ddetr_cli.model import build_criterion, build_model, param_groups
from ddetr_cli.model.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
    paired_generalized_box_iou,
)
from ddetr_cli.model.criterion import sigmoid_focal_loss
from ddetr_cli.model.matcher import HungarianMatcher


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 4] valid cxcywh boxes inside the unit square."""
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], -1)


def random_outputs(batch: int, queries: int, classes: int, generator: torch.Generator) -> dict:
    return {
        "pred_logits": torch.randn(batch, queries, classes, generator=generator),
        "pred_boxes": torch.stack([random_boxes(queries, generator) for _ in range(batch)]),
    }


def random_targets(sizes, classes: int, generator: torch.Generator) -> list[dict]:
    return [
        {"boxes": random_boxes(n, generator), "labels": torch.randint(classes, (n,), generator=generator)}
        for n in sizes
    ]


# ---------------------------------------------------------------- box geometry


def test_giou_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    a = box_cxcywh_to_xyxy(random_boxes(7, g))
    b = box_cxcywh_to_xyxy(random_boxes(5, g))
    torch.testing.assert_close(generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b))
    torch.testing.assert_close(
        paired_generalized_box_iou(a[:5], b), torchvision.ops.generalized_box_iou(a[:5], b).diagonal()
    )
    # Disjoint boxes have negative GIoU; identical boxes 1.
    disjoint = torch.tensor([[0.0, 0.0, 0.1, 0.1]]), torch.tensor([[0.5, 0.5, 0.6, 0.6]])
    assert generalized_box_iou(*disjoint).item() < 0
    assert paired_generalized_box_iou(a, a).allclose(torch.ones(7))


def test_box_conversions_and_inverse_sigmoid():
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(6, g)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)
    x = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    expected = torch.log(x.clamp(min=1e-5) / (1 - x).clamp(min=1e-5))
    torch.testing.assert_close(inverse_sigmoid(x), expected)
    assert inverse_sigmoid(torch.tensor([0.5])).item() == 0.0


# ---------------------------------------------------------------- matcher


def test_matcher_cost_matrix_matches_a_direct_formula():
    g = torch.Generator().manual_seed(2)
    outputs = random_outputs(2, 4, 3, g)
    targets = random_targets([2, 3], 3, g)
    cost = HungarianMatcher().cost_matrix(outputs, targets)
    assert cost.shape == (2, 4, 5)
    all_targets = [(t["labels"][j], t["boxes"][j]) for t in targets for j in range(len(t["labels"]))]
    for b in range(2):
        for q in range(4):
            for k, (label, box) in enumerate(all_targets):
                p = outputs["pred_logits"][b, q, label].sigmoid()
                pos = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8)
                neg = 0.75 * p**2 * -torch.log(1 - p + 1e-8)
                pred = outputs["pred_boxes"][b, q]
                l1 = (pred - box).abs().sum()
                giou = torchvision.ops.generalized_box_iou(
                    box_cxcywh_to_xyxy(pred[None]), box_cxcywh_to_xyxy(box[None])
                )[0, 0]
                expected = 2 * (pos - neg) + 5 * l1 - 2 * giou
                assert math.isclose(cost[b, q, k].item(), expected.item(), rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_matcher_is_optimal_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    queries, sizes = 5, [3, 0, 2]
    outputs = random_outputs(len(sizes), queries, 4, g)
    targets = random_targets(sizes, 4, g)
    matcher = HungarianMatcher()
    indices = matcher(outputs, targets)
    cost = matcher.cost_matrix(outputs, targets).split(sizes, -1)
    for b, (rows, cols) in enumerate(indices):
        n = sizes[b]
        assert len(rows) == len(cols) == n
        assert len(set(rows.tolist())) == n and sorted(cols.tolist()) == list(range(n))
        c = cost[b][b]
        found = c[rows, cols].sum().item()
        best = min(
            (
                sum(c[q, t].item() for t, q in enumerate(perm))
                for perm in itertools.permutations(range(queries), n)
            ),
            default=0.0,
        )
        assert math.isclose(found, best, rel_tol=1e-6, abs_tol=1e-6)


def test_matching_layers_together_equals_matching_them_one_by_one():
    g = torch.Generator().manual_seed(12)
    layers = [random_outputs(3, 6, 4, g) for _ in range(4)]
    targets = random_targets([2, 0, 4], 4, g)
    matcher = HungarianMatcher()
    together = matcher.match_layers(layers, targets)
    for layer, indices in zip(layers, together):
        for (rows, cols), (rows1, cols1) in zip(indices, matcher(layer, targets)):
            assert torch.equal(rows, rows1) and torch.equal(cols, cols1)


def test_matcher_without_any_targets():
    g = torch.Generator().manual_seed(3)
    indices = HungarianMatcher()(random_outputs(2, 4, 3, g), random_targets([0, 0], 3, g))
    assert all(len(r) == 0 and len(c) == 0 and r.dtype == torch.int64 for r, c in indices)


def test_matcher_rejects_labels_out_of_range():
    g = torch.Generator().manual_seed(4)
    targets = random_targets([2], 3, g)
    targets[0]["labels"][0] = 3
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\]"):
        HungarianMatcher()(random_outputs(1, 4, 3, g), targets)


# ---------------------------------------------------------------- losses


def test_focal_loss_matches_the_direct_formula_and_official_normalisation():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 4, generator=g)
    targets = (torch.rand(2, 6, 4, generator=g) > 0.8).float()
    p = logits.sigmoid()
    direct = -(0.25 * (1 - p) ** 2 * torch.log(p) * targets + 0.75 * p**2 * torch.log(1 - p) * (1 - targets))
    num_boxes = 3.0
    loss = sigmoid_focal_loss(logits, targets, num_boxes)
    torch.testing.assert_close(loss, direct.sum() / num_boxes)
    # The official form: mean over queries, sum, / num_boxes, times the number of queries.
    torch.testing.assert_close(loss, direct.mean(1).sum() / num_boxes * logits.shape[1])


# One encoder layer is enough here; three decoder layers give two auxiliary outputs.
tiny_config = functools.partial(
    model_helpers.tiny_config, enc_layers=1, dec_layers=3, num_queries=8, num_classes=4, dropout=0.0
)


def test_criterion_terms_and_weighted_total():
    g = torch.Generator().manual_seed(6)
    config = tiny_config(with_box_refine=True, two_stage=True)
    outputs = random_outputs(2, 8, 4, g)
    outputs["aux_outputs"] = [random_outputs(2, 8, 4, g) for _ in range(2)]
    outputs["enc_outputs"] = random_outputs(2, 30, 4, g)
    losses = build_criterion(config)(outputs, random_targets([3, 1], 4, g))
    terms = [f"loss_{name}{suffix}" for suffix in ["", "_0", "_1", "_enc"] for name in ("ce", "bbox", "giou")]
    assert set(losses) == set(terms) | {"loss", "class_error"}
    weights = {"ce": 2.0, "bbox": 5.0, "giou": 2.0}
    expected = sum(weights[k.split("_")[1]] * losses[k] for k in terms)
    torch.testing.assert_close(losses["loss"], expected)
    assert 0 <= losses["class_error"].item() <= 100


def test_encoder_loss_uses_binary_targets():
    """Encoder proposals are trained to say "object" in class 0, whatever the real class."""
    g = torch.Generator().manual_seed(7)
    criterion = build_criterion(tiny_config(with_box_refine=True, two_stage=True))
    outputs = random_outputs(1, 8, 4, g)
    targets = random_targets([2], 4, g)
    targets[0]["labels"] = torch.tensor([2, 3])
    enc = random_outputs(1, 10, 4, g)
    enc["pred_boxes"][0, :2] = targets[0]["boxes"]  # proposals 0 and 1 are the objects

    def enc_class_loss(confident_classes):
        enc["pred_logits"] = torch.full((1, 10, 4), -20.0)
        enc["pred_logits"][0, 0, confident_classes[0]] = 20.0
        enc["pred_logits"][0, 1, confident_classes[1]] = 20.0
        return criterion({**outputs, "enc_outputs": enc}, targets)["loss_ce_enc"].item()

    assert enc_class_loss([0, 0]) < 1e-6
    assert enc_class_loss([2, 3]) > 1.0


def test_perfect_boxes_have_zero_box_loss_and_num_boxes_normalises():
    g = torch.Generator().manual_seed(8)
    criterion = build_criterion(tiny_config())
    targets = random_targets([2, 3], 4, g)
    outputs = random_outputs(2, 8, 4, g)
    outputs["pred_boxes"][0, :2] = targets[0]["boxes"]
    outputs["pred_boxes"][1, 5:] = targets[1]["boxes"]
    losses = criterion(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    # Doubling the batch doubles the matched boxes and the sums: normalised losses stay the same.
    doubled = {k: torch.cat([v, v]) for k, v in outputs.items()}
    again = criterion(doubled, targets + targets)
    torch.testing.assert_close(again["loss_ce"], losses["loss_ce"])


def test_images_without_targets():
    g = torch.Generator().manual_seed(9)
    losses = build_criterion(tiny_config())(random_outputs(2, 8, 4, g), random_targets([0, 0], 4, g))
    assert torch.isfinite(losses["loss"]) and losses["loss_bbox"].item() == 0.0
    assert losses["loss_ce"].item() > 0  # every prediction is pushed towards background


def test_encoder_loss_is_not_weighted_without_aux_loss():
    """The official weight dict lists the `_enc` terms only when auxiliary losses are on."""
    g = torch.Generator().manual_seed(10)
    outputs = random_outputs(1, 8, 4, g)
    outputs["enc_outputs"] = random_outputs(1, 20, 4, g)
    targets = random_targets([2], 4, g)
    losses = build_criterion(tiny_config(aux_loss=False, with_box_refine=True, two_stage=True))(
        outputs, targets
    )
    assert "loss_ce_enc" in losses
    torch.testing.assert_close(
        losses["loss"], 2 * losses["loss_ce"] + 5 * losses["loss_bbox"] + 2 * losses["loss_giou"]
    )


def test_num_boxes_is_averaged_over_ranks(tmp_path):
    """With torch.distributed initialised (one gloo rank here) the all-reduce path gives the same loss."""
    g = torch.Generator().manual_seed(11)
    criterion = build_criterion(tiny_config())
    outputs, targets = random_outputs(2, 8, 4, g), random_targets([2, 1], 4, g)
    local = criterion(outputs, targets)["loss"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        distributed = criterion(outputs, targets)["loss"]
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(distributed, local)


# ---------------------------------------------------------------- learning


@pytest.mark.slow
def test_tiny_model_halves_its_loss_on_a_fixed_batch():
    """200 AdamW steps (about 7 s on an idle 2-core machine)."""
    torch.manual_seed(0)
    config = tiny_config(dec_layers=2, num_queries=10, num_classes=3, num_feature_levels=2)
    model = build_model(config)
    criterion = build_criterion(config)
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 48:] = True
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[0.6, 0.4, 0.3, 0.3]]), "labels": torch.tensor([0])},
    ]
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, lr_backbone=1e-3), weight_decay=1e-4)
    history = []
    for _ in range(200):
        loss = criterion(model(images, mask), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert min(history[-10:]) < history[0] / 2, (history[0], history[-10:])
