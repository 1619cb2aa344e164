"""Model structure, initialisation, masks, gradients and configuration (tiny models on the CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from model_helpers import one_thread as one_thread  # autouse: one intra-op thread
from model_helpers import tiny_config

from ddetr_cli.model import DeformableDetrConfig, build_criterion, build_model, param_groups, postprocess
from ddetr_cli.model.backbone import FrozenBatchNorm2d
from ddetr_cli.model.encoder import DeformableEncoder
from ddetr_cli.model.position_encoding import PositionEmbeddingSine

VARIANTS = {
    "plain": {},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "single_scale": {"num_feature_levels": 1},
}


def padded_batch(height: int = 96, width: int = 128):
    """Two images; the second is padded on the right and at the bottom."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, height, width)
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    mask[1, :, width * 3 // 4 :] = True
    mask[1, height * 2 // 3 :, :] = True
    images[1][:, mask[1]] = 0.0
    return images, mask


def targets_for(batch: int = 2):
    boxes = [torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]]), torch.tensor([[0.6, 0.4, 0.3, 0.3]])]
    labels = [torch.tensor([1, 2]), torch.tensor([0])]
    return [{"boxes": boxes[i % 2], "labels": labels[i % 2]} for i in range(batch)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shapes(variant):
    config = tiny_config(**VARIANTS[variant])
    model = build_model(config).eval()
    images, mask = padded_batch()
    with torch.no_grad():
        out = model(images, mask)
    B, Q, C = 2, config.num_queries, config.num_classes
    assert out["pred_logits"].shape == (B, Q, C)
    assert out["pred_boxes"].shape == (B, Q, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == config.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (B, Q, C) and aux["pred_boxes"].shape == (B, Q, 4)
    if config.two_stage:
        # One proposal per position of the 4 levels (strides 8, 16, 32, 64 of 96x128).
        positions = 12 * 16 + 6 * 8 + 3 * 4 + 2 * 2
        assert out["enc_outputs"]["pred_logits"].shape == (B, positions, C)
        assert out["enc_outputs"]["pred_boxes"].shape == (B, positions, 4)
    else:
        assert "enc_outputs" not in out


def test_aux_loss_off_has_no_aux_outputs():
    model = build_model(tiny_config(aux_loss=False)).eval()
    out = model(*padded_batch(64, 64))
    assert set(out) == {"pred_logits", "pred_boxes"}


def test_two_stage_with_too_few_positions_is_a_clear_error():
    model = build_model(tiny_config(with_box_refine=True, two_stage=True, num_queries=300)).eval()
    with pytest.raises(ValueError, match="num_queries=300"):
        model(torch.zeros(1, 3, 64, 96))


def test_no_mask_means_no_padding():
    model = build_model(tiny_config()).eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a = model(images)
        b = model(images, torch.zeros(2, 64, 96, dtype=torch.bool))
    assert torch.equal(a["pred_logits"], b["pred_logits"])
    assert torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_batch_elements_are_independent():
    """An image's predictions do not depend on the padded image batched with it."""
    model = build_model(tiny_config(**VARIANTS["two_stage"])).eval()
    images, mask = padded_batch()
    with torch.no_grad():
        batched = model(images, mask)
        alone = model(images[:1], mask[:1])
    torch.testing.assert_close(batched["pred_logits"][:1], alone["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched["pred_boxes"][:1], alone["pred_boxes"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformer_ignores_features_under_the_mask(variant):
    """Whatever the features at padded positions are, the transformer's outputs do not change.

    (The whole model is not padding-invariant, as in the official code: the CNN's receptive
    fields cross into the padding.)
    """
    model = build_model(tiny_config(**VARIANTS[variant])).eval()
    images, mask = padded_batch()
    with torch.no_grad():
        srcs, masks, pos = model._feature_pyramid(images, mask)
        query = None if model.two_stage else model.query_embed.weight
        reference = model.transformer(srcs, masks, pos, query)
        noisy = [torch.where(m[:, None], torch.randn_like(s) * 10, s) for s, m in zip(srcs, masks)]
        perturbed = model.transformer(noisy, masks, pos, query)
    assert masks[0][1].any() and not masks[0][0].any()
    # hs, init_reference, inter_references, and in two-stage mode the encoder proposals' logits
    # and boxes (+inf at padding, whose logits come from zeroed memory).
    for a, b in zip(reference, perturbed):
        if a is None:
            continue
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b))
        torch.testing.assert_close(a[finite], b[finite], atol=1e-5, rtol=1e-5)


def test_mask_changes_the_output():
    model = build_model(tiny_config()).eval()
    images = torch.randn(1, 3, 64, 96)
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    mask[:, :, 64:] = True
    with torch.no_grad():
        # (Logits: at initialisation the boxes are the image-independent reference points.)
        a = model(images)["pred_logits"]
        b = model(images, mask)["pred_logits"]
    assert not torch.allclose(a, b, atol=1e-4)


def test_position_encoding_depends_only_on_the_valid_image():
    """Valid pixels of a padded map get the same encoding as the same pixels of the unpadded map."""
    encode = PositionEmbeddingSine(16)
    small = torch.zeros(1, 5, 7, dtype=torch.bool)
    padded = torch.ones(1, 8, 12, dtype=torch.bool)
    padded[:, :5, :7] = False
    torch.testing.assert_close(encode(padded)[..., :5, :7], encode(small))
    pos = encode(small)
    assert pos.shape == (1, 32, 5, 7)
    # First channel of the y half: sin of the normalised row centre (0.5 / (5 + 1e-6) * 2 pi).
    assert math.isclose(pos[0, 0, 0, 0].item(), math.sin((1 - 0.5) / (5 + 1e-6) * 2 * math.pi), rel_tol=1e-5)
    # First channel of the x half: the same for columns.
    assert math.isclose(pos[0, 16, 0, 6].item(), math.sin((7 - 0.5) / (7 + 1e-6) * 2 * math.pi), abs_tol=1e-5)


def test_encoder_reference_points_are_pixel_centres():
    shapes = torch.tensor([[4, 6], [2, 3]])
    ratios = torch.tensor([[[0.5, 0.75], [0.5, 0.75]]])  # (w, h) valid fractions on both levels
    ref = DeformableEncoder.get_reference_points(shapes, ratios)
    assert ref.shape == (1, 4 * 6 + 2 * 3, 2, 2)
    # On its own level, a point is its pixel centre in the padded map.
    torch.testing.assert_close(ref[0, 7, 0], torch.tensor([1.5 / 6, 1.5 / 4]))
    torch.testing.assert_close(ref[0, 24 + 4, 1], torch.tensor([1.5 / 3, 1.5 / 2]))
    # Same-ratio levels: the coordinates transfer unchanged.
    torch.testing.assert_close(ref[0, :, 0], ref[0, :, 1])


@pytest.mark.parametrize("variant", ["plain", "box_refine", "two_stage"])
def test_gradients_reach_every_trainable_parameter(variant):
    """After a few optimiser steps every trainable parameter has a non-zero gradient.

    (At step 0 the box head's hidden layers get exactly zero gradient: its last layer is
    zero-initialised, as in the official code. In two-stage mode `query_embed` and
    `transformer.reference_points` do not exist: queries come from the proposals.)
    """
    torch.manual_seed(0)
    # ResNet-18 once (its frozen stem/layer1 must not count), the tiny CNN for the others.
    backbone = "resnet18" if variant == "plain" else "tiny"
    config = tiny_config(backbone=backbone, dropout=0.0, **VARIANTS[variant])
    model = build_model(config)
    criterion = build_criterion(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    images, mask = padded_batch(64, 96)
    for _ in range(2):
        optimizer.zero_grad()
        criterion(model(images, mask), targets_for())["loss"].backward()
        optimizer.step()
    optimizer.zero_grad()
    criterion(model(images, mask), targets_for())["loss"].backward()
    dead = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert dead == []
    if variant == "two_stage":
        names = dict(model.named_parameters())
        assert "query_embed.weight" not in names and "transformer.reference_points.weight" not in names


def test_head_sharing_matches_the_official_layout():
    plain = build_model(tiny_config())
    assert all(head is plain.class_embed[0] for head in plain.class_embed)
    assert plain.transformer.decoder.bbox_embed is None
    refine = build_model(tiny_config(with_box_refine=True))
    assert refine.bbox_embed[0] is not refine.bbox_embed[1]
    assert refine.transformer.decoder.bbox_embed is refine.bbox_embed
    assert refine.transformer.decoder.class_embed is None
    two_stage = build_model(tiny_config(with_box_refine=True, two_stage=True))
    assert len(two_stage.class_embed) == len(two_stage.bbox_embed) == 3  # dec_layers + 1
    assert two_stage.transformer.decoder.class_embed is two_stage.class_embed
    keys = set(two_stage.state_dict())
    assert {"transformer.enc_output.weight", "transformer.pos_trans_norm.bias", "class_embed.2.bias"} <= keys
    assert "transformer.decoder.bbox_embed.2.layers.2.weight" in keys
    assert "query_embed.weight" not in keys and "transformer.reference_points.weight" not in keys


def test_official_state_dict_names():
    model = build_model(tiny_config(backbone="resnet18", enc_layers=1, dec_layers=1))
    keys = set(model.state_dict())
    expected = {
        "backbone.0.body.conv1.weight",
        "backbone.0.body.bn1.running_var",
        "backbone.0.body.layer4.1.conv2.weight",
        "input_proj.0.0.weight",
        "input_proj.3.1.bias",
        "query_embed.weight",
        "class_embed.0.weight",
        "bbox_embed.0.layers.2.bias",
        "transformer.level_embed",
        "transformer.reference_points.weight",
        "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
        "transformer.encoder.layers.0.self_attn.attention_weights.bias",
        "transformer.encoder.layers.0.self_attn.value_proj.weight",
        "transformer.encoder.layers.0.self_attn.output_proj.bias",
        "transformer.encoder.layers.0.norm2.weight",
        "transformer.decoder.layers.0.cross_attn.sampling_offsets.bias",
        "transformer.decoder.layers.0.self_attn.in_proj_weight",
        "transformer.decoder.layers.0.self_attn.out_proj.weight",
        "transformer.decoder.layers.0.norm3.bias",
        "transformer.decoder.layers.0.linear2.weight",
    }
    assert expected <= keys
    assert not any("num_batches_tracked" in k or k.startswith("backbone.0.body.fc") for k in keys)


def test_official_initialisation():
    model = build_model(tiny_config(with_box_refine=True))
    bias_value = -math.log((1 - 0.01) / 0.01)
    for head in model.class_embed:
        torch.testing.assert_close(head.bias, torch.full_like(head.bias, bias_value))
    for i, head in enumerate(model.bbox_embed):
        assert not head.layers[-1].weight.any()
        expected_wh = -2.0 if i == 0 else 0.0  # official: only the first refine head gets the -2
        assert head.layers[-1].bias.tolist() == [0.0, 0.0, expected_wh, expected_wh]
    plain = build_model(tiny_config())
    assert plain.bbox_embed[0].layers[-1].bias.tolist() == [0.0, 0.0, -2.0, -2.0]
    two_stage = build_model(tiny_config(with_box_refine=True, two_stage=True))
    assert all(not h.layers[-1].bias.any() for h in two_stage.bbox_embed)

    attn = model.transformer.encoder.layers[0].self_attn
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
    offsets = attn.sampling_offsets.bias.view(attn.n_heads, attn.n_levels, attn.n_points, 2)
    # nheads=2: head 0 points along +x, head 1 along -x; point k at distance k + 1.
    torch.testing.assert_close(offsets[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    torch.testing.assert_close(offsets[1, 3], torch.tensor([[-1.0, 0.0], [-2.0, 0.0]]), atol=1e-6, rtol=0)
    assert not attn.value_proj.bias.any() and not model.transformer.reference_points.bias.any()
    assert all(not proj[0].bias.any() for proj in model.input_proj)
    assert model.transformer.level_embed.std() > 0.5


def test_sampling_offset_grid_for_eight_heads():
    attn = build_model(tiny_config(hidden_dim=64, nheads=8)).transformer.encoder.layers[0].self_attn
    first_points = attn.sampling_offsets.bias.view(8, 4, 2, 2)[:, 0, 0]
    expected = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]]).float()
    torch.testing.assert_close(first_points, expected, atol=1e-6, rtol=0)


def test_resnet_frozen_layers_and_frozen_batchnorm():
    model = build_model(tiny_config(backbone="resnet18"))
    body = model.backbone[0].body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad and body.layer4[1].conv2.weight.requires_grad
    frozen = build_model(tiny_config(backbone="resnet18", train_backbone=False))
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert frozen.input_proj[0][0].weight.requires_grad


def test_ordinary_batchnorm_option():
    model = build_model(tiny_config(backbone="resnet18", frozen_bn=False))
    body = model.backbone[0].body
    assert type(body.bn1) is torch.nn.BatchNorm2d
    assert not body.bn1.weight.requires_grad and body.layer2[0].bn1.weight.requires_grad
    out = model(*padded_batch(64, 96))
    assert torch.isfinite(out["pred_logits"]).all()


def test_dc5_and_single_scale_feature_strides():
    model = build_model(tiny_config(backbone="resnet50", dilation=True, num_feature_levels=1)).eval()
    features, masks, _ = model.backbone(torch.zeros(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    assert [f.shape for f in features] == [(1, 2048, 4, 6)]  # stride 16 with dilation
    assert masks[0].shape == (1, 4, 6)
    assert model.input_proj[0][0].in_channels == 2048


def _save_resnet18(path, timm_style: bool):
    if timm_style:
        timm = pytest.importorskip("timm")
        state = timm.create_model("resnet18", pretrained=False).state_dict()
    else:
        state = {f"module.{k}": v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    torch.save({"state_dict": state} if not timm_style else state, path)
    return {k.removeprefix("module."): v for k, v in state.items()}


@pytest.mark.parametrize("timm_style", [False, True])
def test_pretrained_backbone_from_a_local_file(tmp_path, timm_style):
    path = tmp_path / "resnet18.pth"
    saved = _save_resnet18(path, timm_style)
    model = build_model(tiny_config(backbone="resnet18", pretrained_backbone=str(path)))
    body = model.backbone[0].body
    torch.testing.assert_close(body.layer3[0].conv1.weight, saved["layer3.0.conv1.weight"])
    torch.testing.assert_close(body.bn1.running_var, saved["bn1.running_var"])


def test_pretrained_backbone_errors_name_the_file(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="wrong.pth.*not weights for this backbone"):
        build_model(tiny_config(backbone="resnet18", pretrained_backbone=str(wrong)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth: cannot read"):
        build_model(tiny_config(backbone="resnet18", pretrained_backbone=str(garbage)))
    with pytest.raises(ValueError, match="missing.pth: backbone weights file not found"):
        build_model(tiny_config(backbone="resnet18", pretrained_backbone=str(tmp_path / "missing.pth")))


def test_param_groups_follow_the_official_split():
    model = build_model(tiny_config(backbone="resnet18"))
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, lr_backbone=1e-5)}
    assert groups["main"]["lr"] == 1e-4 and groups["backbone"]["lr"] == 1e-5
    assert math.isclose(groups["linear_proj"]["lr"], 1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("backbone.0.") for p in groups["backbone"]["params"])
    linear = {names[id(p)] for p in groups["linear_proj"]["params"]}
    assert "transformer.reference_points.weight" in linear
    assert all("sampling_offsets" in n or "reference_points" in n for n in linear)
    grouped = sum(len(g["params"]) for g in groups.values())
    assert grouped == sum(1 for p in model.parameters() if p.requires_grad)


def test_postprocess_top_k_and_absolute_boxes():
    logits = torch.full((2, 3, 4), -10.0)
    logits[0, 2, 1] = 3.0
    logits[0, 0, 3] = 2.0
    logits[1, 1, 0] = 1.0
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5], [0.1, 0.2, 0.2, 0.2]]).repeat(2, 1, 1)
    results = postprocess(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200], [50, 50]]), topk=2
    )
    first = results[0]
    assert first["labels"].tolist() == [1, 3]
    torch.testing.assert_close(first["scores"], torch.sigmoid(torch.tensor([3.0, 2.0])))
    torch.testing.assert_close(
        first["boxes"][0], torch.tensor([0.0, 10.0, 40.0, 30.0])
    )  # query 2, (h, w) = (100, 200)
    torch.testing.assert_close(first["boxes"][1], torch.tensor([80.0, 30.0, 120.0, 70.0]))  # query 0
    assert results[1]["labels"][0] == 0
    torch.testing.assert_close(results[1]["boxes"][0], torch.tensor([0.0, 0.0, 25.0, 25.0]))
    assert len(postprocess({"pred_logits": logits, "pred_boxes": boxes}, [[1, 1], [1, 1]])[0]["scores"]) == 12
    with pytest.raises(ValueError, match="target_sizes"):
        postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.ones(3, 2))


def test_config_round_trip_and_validation():
    config = DeformableDetrConfig(
        num_classes=3,
        class_names=["a", "b", "c"],
        category_ids=[1, 5, 9],
        two_stage=True,
        with_box_refine=True,
    )
    data = config.to_dict()
    assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in data.values())
    assert DeformableDetrConfig.from_dict(data) == config
    assert DeformableDetrConfig.from_dict({"num_classes": 7}) == DeformableDetrConfig(num_classes=7)
    with pytest.raises(ValueError, match="unknown DeformableDetrConfig field.*hiden_dim"):
        DeformableDetrConfig.from_dict({"hiden_dim": 64})
    with pytest.raises(ValueError, match="two_stage requires with_box_refine"):
        DeformableDetrConfig(two_stage=True)
    with pytest.raises(ValueError, match="class_names has 2 names but num_classes is 3"):
        DeformableDetrConfig(num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="backbone must be one of"):
        DeformableDetrConfig(backbone="vgg16")
    with pytest.raises(ValueError, match="dilation"):
        DeformableDetrConfig(backbone="resnet18", dilation=True)
    with pytest.raises(ValueError, match="multiple of 32"):
        DeformableDetrConfig(hidden_dim=48)
    with pytest.raises(ValueError, match="pretrained_backbone needs a ResNet"):
        DeformableDetrConfig(backbone="tiny", pretrained_backbone="weights.pth")


def test_paper_defaults():
    config = DeformableDetrConfig()
    assert (config.backbone, config.num_feature_levels, config.hidden_dim, config.nheads) == (
        "resnet50",
        4,
        256,
        8,
    )
    assert (config.enc_layers, config.dec_layers, config.dim_feedforward, config.num_queries) == (
        6,
        6,
        1024,
        300,
    )
    assert (config.cls_loss_coef, config.bbox_loss_coef, config.giou_loss_coef) == (2, 5, 2)
    assert (config.set_cost_class, config.set_cost_bbox, config.set_cost_giou, config.focal_alpha) == (
        2,
        5,
        2,
        0.25,
    )
    assert math.isclose(config.position_embedding_scale, 2 * math.pi)


# Trainable parameters of the official models (what the official main.py prints as "number of
# params"). 39,847,265 for the plain R50 model is the published figure (the paper's "40M"); the
# others follow from it: box refinement adds 5 unshared copies of the class head (256*91+91) and
# box MLP (2*(256*256+256) + 256*4+4), two-stage adds one more of each plus enc_output (+norm) and
# pos_trans (+norm) and drops query_embed (300*512) and reference_points (256*2+2). The frozen
# stem and layer1 of ResNet-50 hold another 222,400 parameters.
FULL_SIZE_TRAINABLE = {
    "plain": 39_847_265,
    "box_refine": 40_627_260,
    "two_stage": 40_959_129,
    "single_scale": 33_844_193,
}


@pytest.mark.parametrize("variant", FULL_SIZE_TRAINABLE)
def test_full_size_r50_parameter_count(variant):
    model = build_model(DeformableDetrConfig(**VARIANTS[variant]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert trainable == FULL_SIZE_TRAINABLE[variant]
    assert total - trainable == 222_400
    head = 256 * 91 + 91 + 2 * (256 * 256 + 256) + 256 * 4 + 4
    assert FULL_SIZE_TRAINABLE["box_refine"] - FULL_SIZE_TRAINABLE["plain"] == 5 * head
