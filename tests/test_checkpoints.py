"""Checkpoint loading: Hugging Face, official and ddetr files give the reference outputs.

The reference is transformers' `DeformableDetrForObjectDetection` (random weights, no download).
Every parameter and buffer is randomised (biases and BatchNorm statistics included) so that a
mapping bug cannot hide behind a zero or identity initialisation. Outputs are compared in eval mode
on a batch of two images, the second one padded.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle

import pytest
import torch
from hf_reference import VARIANTS, HFConfig, HFModel, hf_model, randomise
from model_helpers import one_thread as one_thread  # autouse: one intra-op thread
from torch import nn

from ddetr_cli.model import DeformableDetrConfig, build_model
from ddetr_cli.model.checkpoint import (
    CheckpointError,
    load_model,
    model_checkpoint,
    save_hf_directory,
    to_hf_state_dict,
)
from ddetr_cli.model.hf_keys import hf_to_official

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def inputs(height: int = 64, width: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images [2, 3, H, W]; the second is valid on its top-left (H-14) x (W-20) only."""
    g = torch.Generator().manual_seed(123)
    images = torch.randn(2, 3, height, width, generator=g)
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    mask[1, height - 14 :, :] = True
    mask[1, :, width - 20 :] = True
    return images.masked_fill(mask[:, None], 0.0), mask


@torch.no_grad()
def reference(model: nn.Module, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """HF's final logits/boxes, every decoder layer's (its heads on its intermediate states, as
    its forward does) and, for two-stage, the encoder proposals."""
    out = model(pixel_values=images, pixel_mask=(~mask).long())
    ref = {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}
    hs, refs = out.intermediate_hidden_states, out.intermediate_reference_points
    layer_logits, layer_boxes = [], []
    for lvl in range(hs.shape[1]):
        reference_points = out.init_reference_points if lvl == 0 else refs[:, lvl - 1]
        delta = model.bbox_embed[lvl](hs[:, lvl])
        unact = torch.logit(reference_points.clamp(0, 1), eps=1e-5)  # HF's inverse_sigmoid
        if unact.shape[-1] == 2:
            delta = torch.cat([delta[..., :2] + unact, delta[..., 2:]], -1)
        else:
            delta = delta + unact
        layer_logits.append(model.class_embed[lvl](hs[:, lvl]))
        layer_boxes.append(delta.sigmoid())
    ref["layer_logits"], ref["layer_boxes"] = torch.stack(layer_logits), torch.stack(layer_boxes)
    if out.enc_outputs_class is not None:
        ref["enc_logits"], ref["enc_boxes"] = out.enc_outputs_class, out.enc_outputs_coord_logits.sigmoid()
    return ref


@torch.no_grad()
def assert_matches(model: nn.Module, ref: dict[str, torch.Tensor], images, mask) -> None:
    assert not model.training
    out = model(images, mask)
    got = {
        "pred_logits": out["pred_logits"],
        "pred_boxes": out["pred_boxes"],
        "layer_logits": torch.stack([a["pred_logits"] for a in out["aux_outputs"]] + [out["pred_logits"]]),
        "layer_boxes": torch.stack([a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]]),
    }
    if "enc_logits" in ref:
        got["enc_logits"], got["enc_boxes"] = (
            out["enc_outputs"]["pred_logits"],
            out["enc_outputs"]["pred_boxes"],
        )
        _align_proposal_order(got, ref, model.config.num_queries)
    assert set(got) == set(ref)
    for key in ref:
        assert got[key].shape == ref[key].shape, key
        torch.testing.assert_close(got[key], ref[key], atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def _align_proposal_order(got: dict, ref: dict, num_queries: int) -> None:
    """Two-stage: put our decoder queries in the reference's proposal order.

    Both models take the top-k encoder proposals by score; two proposals whose scores differ by
    less than float noise (3e-7 seen with random weights) may come out of torch.topk in either
    order. The decoder is permutation-equivariant over its queries, so such a swap only swaps two
    output rows. Each side's order is computed from its own encoder scores; the chosen proposal
    sets must be equal.
    """
    ours = torch.topk(got["enc_logits"][..., 0], num_queries, dim=1)[1]
    theirs = torch.topk(ref["enc_logits"][..., 0], num_queries, dim=1)[1]
    for b in range(ours.shape[0]):
        assert set(ours[b].tolist()) == set(theirs[b].tolist()), "different two-stage proposals chosen"
        position = {int(index): q for q, index in enumerate(ours[b].tolist())}
        perm = torch.tensor([position[int(index)] for index in theirs[b]])
        for key in ("pred_logits", "pred_boxes"):
            got[key][b] = got[key][b, perm]
        for key in ("layer_logits", "layer_boxes"):
            got[key][:, b] = got[key][:, b, perm]


def official_args(hf: nn.Module) -> argparse.Namespace:
    """What the official main.py pickles as `args` (the fields that matter here)."""
    c = hf.config
    return argparse.Namespace(
        backbone="resnet18",
        dilation=False,
        nheads=c.encoder_attention_heads,
        num_queries=c.two_stage_num_proposals if c.two_stage else c.num_queries,
        with_box_refine=c.with_box_refine,
        two_stage=c.two_stage,
        dropout=0.1,
        lr_backbone=2e-5,
        output_dir="exps/r50_deformable_detr",
    )


@pytest.fixture(scope="module")
def hf_models():
    return {variant: hf_model(variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def references(hf_models, batch):
    """HF's outputs on `batch` for each variant, computed once."""
    return {variant: reference(model, *batch) for variant, model in hf_models.items()}


@pytest.fixture(scope="module")
def batch():
    return inputs()


# ---------------------------------------------------------------------------------------------
# Hugging Face directories


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_directory_matches_reference(variant, hf_models, references, batch, tmp_path):
    """A directory written by the installed transformers' save_pretrained (legacy key names, tied
    head copies left out) loads and reproduces HF's logits and boxes."""
    hf = hf_models[variant]
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.config.two_stage == hf.config.two_stage
    assert model.config.with_box_refine == hf.config.with_box_refine
    assert model.config.nheads == hf.config.encoder_attention_heads
    assert model.config.num_classes == 5 and model.config.class_names is None
    assert_matches(model, references[variant], *batch)


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_hf_directory_with_every_key_and_untied_heads(weights_file, batch, tmp_path):
    """Files holding every key under current names (as transformers 4.x wrote them), with one
    class head per decoder layer (official box refinement), safetensors or torch pickle."""
    hf = hf_model("box_refine", seed=1)
    for i in range(1, len(hf.class_embed)):  # transformers 5.x ties them; the official model does not
        hf.class_embed[i] = nn.Linear(32, 5)
    randomise(hf, seed=2)
    assert not torch.equal(hf.class_embed[0].weight, hf.class_embed[-1].weight)
    hf.config.id2label = {i: f"shape{i}" for i in range(5)}
    hf.config.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    if weights_file.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(tmp_path / weights_file))
    else:
        torch.save(state, tmp_path / weights_file)
    model = load_model(tmp_path)
    assert model.config.class_names == [f"shape{i}" for i in range(5)]
    assert_matches(model, reference(hf, *batch), *batch)


def test_hf_resnet_backbone_layout(batch, tmp_path):
    """transformers' own ResNet backbone (use_timm_backbone=False) maps onto torchvision's."""
    resnet = transformers.ResNetConfig(
        layer_type="basic",
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        out_features=["stage2", "stage3", "stage4"],
    )
    hf = hf_model("plain", seed=3, use_timm_backbone=False, backbone_config=resnet)
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    assert model.config.backbone == "resnet18"
    ref = reference(hf, *batch)
    assert_matches(model, ref, *batch)

    # And back: our weights in that layout load strictly into a fresh HF model.
    fresh = HFModel(hf.config).eval()
    fresh.load_state_dict(to_hf_state_dict(model, backbone_layout="hf"), strict=True)
    out = reference(fresh, *batch)
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# official checkpoints


@pytest.mark.parametrize("variant", ["plain", "box_refine", "two_stage", "single_scale"])
def test_official_checkpoint_matches_reference(variant, hf_models, references, batch, tmp_path):
    """The same weights in the official layout, saved as the official main.py does, load with the
    configuration inferred from names and shapes (+ `args`) and reproduce HF's outputs."""
    hf = hf_models[variant]
    state = hf_to_official(hf.state_dict())
    expected_keys = set(build_model(load_model_config(hf)).state_dict())
    assert set(state) == expected_keys  # exactly the official module tree

    path = tmp_path / "checkpoint.pth"
    if variant in ("plain", "single_scale"):  # 8 heads: a bare {"model": ...} is enough
        prefix = "module." if variant == "plain" else ""  # DistributedDataParallel's prefix
        torch.save({"model": {prefix + k: v for k, v in state.items()}}, path)
    else:
        payload = {"model": state, "args": official_args(hf), "epoch": 49}
        payload["optimizer"] = torch.optim.AdamW(nn.Linear(2, 2).parameters()).state_dict()
        torch.save(payload, path)
    model = load_model(path)
    assert model.config.num_queries == 10 and model.config.num_classes == 5
    assert model.config.enc_n_points == 2 and model.config.dec_n_points == 3
    assert_matches(model, references[variant], *batch)


def test_bare_state_dicts_in_either_layout(hf_models, references, batch, tmp_path):
    """A bare official-layout safetensors file, and HF-named weights in a .pth without config.json,
    are recognised from their keys."""
    from safetensors.torch import save_file

    hf = hf_models["plain"]
    save_file(
        {k: v.clone() for k, v in hf_to_official(hf.state_dict()).items()}, str(tmp_path / "a.safetensors")
    )
    assert_matches(load_model(tmp_path / "a.safetensors"), references["plain"], *batch)
    torch.save(hf.state_dict(), tmp_path / "hf_named.pth")
    assert_matches(load_model(tmp_path / "hf_named.pth"), references["plain"], *batch)


def load_model_config(hf: nn.Module) -> DeformableDetrConfig:
    c = hf.config
    return DeformableDetrConfig(
        backbone="resnet18",
        num_feature_levels=c.num_feature_levels,
        hidden_dim=c.d_model,
        nheads=c.encoder_attention_heads,
        enc_layers=c.encoder_layers,
        dec_layers=c.decoder_layers,
        dim_feedforward=c.encoder_ffn_dim,
        enc_n_points=c.encoder_n_points,
        dec_n_points=c.decoder_n_points,
        num_queries=c.num_queries,
        num_classes=c.num_labels,
        with_box_refine=c.with_box_refine,
        two_stage=c.two_stage,
    )


def test_bare_state_dict_needs_heads_when_not_eight(hf_models, references, batch, tmp_path):
    """Heads cannot be read off the weights (only heads x points can): a bare state dict takes
    them from config_overrides, and a clear error asks for them when 8 cannot be right."""
    hf = hf_models["box_refine"]  # 4 heads
    state = hf_to_official(hf.state_dict())
    path = tmp_path / "bare.pth"
    torch.save(state, path)
    model = load_model(path, config_overrides={"nheads": 4})
    assert model.config.nheads == 4 and model.config.enc_n_points == 2
    assert_matches(model, references["box_refine"], *batch)
    state["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"] = torch.zeros(4 * 4 * 3 * 2, 32)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="nheads"):
        load_model(path)


@pytest.mark.slow
def test_full_size_r50_matches_reference(tmp_path):
    """The paper's R50 configuration (two-stage + box refinement, 300 queries, 91 classes)."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    hf = HFModel(HFConfig(use_pretrained_backbone=False, num_labels=91, with_box_refine=True, two_stage=True))
    hf.eval()
    randomise(hf, seed=5)
    images, mask = inputs(128, 160)
    ref = reference(hf, images, mask)
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    assert model.config.backbone == "resnet50" and model.config.hidden_dim == 256
    assert model.config.num_queries == 300 and model.config.num_classes == 91
    assert_matches(model, ref, images, mask)

    path = tmp_path / "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.pth"
    args = argparse.Namespace(nheads=8, num_queries=300, dilation=False, backbone="resnet50")
    torch.save({"model": model.state_dict(), "args": args}, path)
    assert_matches(load_model(path), ref, images, mask)


@pytest.mark.slow
def test_dc5_resnet50_in_legacy_torch_format(batch, tmp_path):
    """DC5 (dilated C5; timm's output_stride=16 in HF) is torchvision's dilation, and the pre-1.6
    torch format the official checkpoints may use loads too, `args` Namespace included."""
    hf = hf_model("plain", seed=6, backbone="resnet50", dilation=True)
    ref = reference(hf, *batch)
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    assert model.config.dilation and model.config.backbone == "resnet50"
    assert_matches(model, ref, *batch)

    path = tmp_path / "r50_deformable_detr_dc5.pth"
    args = argparse.Namespace(dilation=True, nheads=8, backbone="resnet50")
    torch.save({"model": model.state_dict(), "args": args}, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"  # a bare pickle stream, not a zip archive
    legacy = load_model(path)
    assert legacy.config.dilation
    assert_matches(legacy, ref, *batch)


# ---------------------------------------------------------------------------------------------
# ddetr checkpoints and export


def test_ddetr_checkpoint_round_trip(hf_models, references, batch, tmp_path):
    hf = hf_models["two_stage"]
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    payload = model_checkpoint(model)
    assert payload["format"] == "ddetr" and payload["version"] == 1
    payload.update(optimizer={"state": {}, "param_groups": []}, epoch=3)  # what the CLI adds
    torch.save(payload, tmp_path / "ddetr.pth")
    again = load_model(tmp_path / "ddetr.pth")
    assert again.config == model.config
    assert_matches(again, references["two_stage"], *batch)


@pytest.mark.parametrize("variant", ["box_refine", "two_stage"])
def test_export_to_hugging_face(variant, hf_models, references, batch, tmp_path):
    """save_hf_directory writes what transformers' from_pretrained loads, with the same outputs."""
    hf = hf_models[variant]
    hf.save_pretrained(tmp_path / "src")
    model = load_model(tmp_path / "src")
    save_hf_directory(model, tmp_path / "out")
    back = HFModel.from_pretrained(tmp_path / "out").eval()
    ref = references[variant]
    out = reference(back, *batch)
    assert set(out) == set(ref)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], atol=ATOL, rtol=0)
    fresh = HFModel(hf.config).eval()
    fresh.load_state_dict(to_hf_state_dict(model), strict=True)


def test_tiny_backbone_state_dict_infers_config(tmp_path):
    """ddetr's demo backbone is recognised from the weights alone."""
    config = DeformableDetrConfig(
        backbone="tiny",
        hidden_dim=64,
        enc_layers=1,
        dec_layers=2,
        dim_feedforward=32,
        num_queries=7,
        num_classes=3,
    )
    model = build_model(config).eval()
    randomise(model)
    torch.save({"model": model.state_dict()}, tmp_path / "tiny.pth")
    loaded = load_model(tmp_path / "tiny.pth")
    assert loaded.config.backbone == "tiny" and loaded.config.dec_layers == 2
    images, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, mask)["pred_logits"], model(images, mask)["pred_logits"])


# ---------------------------------------------------------------------------------------------
# fine-tuning with another class count


def test_other_class_count_reinitialises_class_heads(hf_models, batch, tmp_path, caplog):
    hf = hf_models["two_stage"]
    path = tmp_path / "official.pth"
    torch.save({"model": hf_to_official(hf.state_dict()), "args": official_args(hf)}, path)
    with caplog.at_level("WARNING", logger="ddetr"):
        model = load_model(path, num_classes=3)
    message = " ".join(r.getMessage() for r in caplog.records if r.name == "ddetr")
    assert "5 classes" in message and "re-initialised" in message and str(path) in message
    assert model.config.num_classes == 3
    with torch.no_grad():
        out = model(*batch)
    assert out["pred_logits"].shape == (2, 10, 3)
    prior = -math.log((1 - 0.01) / 0.01)
    for head in list(model.class_embed) + list(model.transformer.decoder.class_embed):
        torch.testing.assert_close(head.bias, torch.full((3,), prior))
    # everything else is the checkpoint's
    torch.testing.assert_close(model.transformer.level_embed, hf.model.level_embed)
    torch.testing.assert_close(model.bbox_embed[1].layers[0].weight, hf.bbox_embed[1].layers[0].weight)

    caplog.clear()
    with caplog.at_level("WARNING", logger="ddetr"):
        load_model(path, num_classes=5)  # same count: nothing re-initialised, nothing said
    assert not [r for r in caplog.records if r.name == "ddetr"]


# ---------------------------------------------------------------------------------------------
# bad checkpoints


def expect_error(path, match: str, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert os.path.basename(str(path)) in message
    assert match in message, message
    return message


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_missing_path_and_plain_directory(tmp_path):
    expect_error(tmp_path / "nope.pth", "no such file")
    expect_error(tmp_path, "without config.json")
    (tmp_path / "config.json").write_text('{"model_type": "deformable_detr"}')
    expect_error(tmp_path, "no model.safetensors or pytorch_model.bin")
    (tmp_path / "config.json").write_text("{not json")
    expect_error(tmp_path, "not valid JSON")


def test_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    expect_error(tmp_path / "notes.pth", "not a PyTorch or safetensors checkpoint")
    (tmp_path / "empty.pth").write_bytes(b"")
    expect_error(tmp_path / "empty.pth", "empty file")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    expect_error(tmp_path / "list.pth", "not a checkpoint dict")


def test_truncated_files(hf_models, tmp_path):
    state = hf_to_official(hf_models["plain"].state_dict())
    torch.save({"model": state}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "cut.pth", "truncated")

    from safetensors.torch import save_file

    save_file({k: v.clone() for k, v in state.items()}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "cut.safetensors", "truncated")
    (tmp_path / "header.safetensors").write_bytes(data[:100])
    expect_error(tmp_path / "header.safetensors", "truncated")


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    evil = _RunsCode()
    evil.marker = marker
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "args": evil}, path)
    message = expect_error(path, "refused")
    assert "system" in message
    # the same payload in the legacy (non-zip) format
    with open(tmp_path / "evil_legacy.pth", "wb") as f:
        pickle.dump({"model": evil}, f, protocol=2)
    expect_error(tmp_path / "evil_legacy.pth", "refused")
    assert not marker.exists()


def test_another_models_keys(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    expect_error(tmp_path / "resnet18.pth", "not a Deformable DETR checkpoint")
    detr_like = {
        "backbone.0.body.conv1.weight": torch.zeros(64, 3, 7, 7),
        "transformer.encoder.layers.0.self_attn.in_proj_weight": torch.zeros(768, 256),
        "class_embed.weight": torch.zeros(92, 256),
        "query_embed.weight": torch.zeros(100, 256),
    }
    torch.save({"model": detr_like}, tmp_path / "detr.pth")
    expect_error(tmp_path / "detr.pth", "not a Deformable DETR checkpoint")


def test_keys_that_do_not_fit(hf_models, tmp_path):
    state = hf_to_official(hf_models["plain"].state_dict())
    del state["transformer.encoder.layers.1.linear1.bias"]
    state["transformer.decoder.layers.0.extra.weight"] = torch.zeros(3)
    state["transformer.decoder.layers.1.linear2.weight"] = torch.zeros(32, 48)
    torch.save({"model": state}, tmp_path / "broken.pth")
    message = expect_error(tmp_path / "broken.pth", "do not fit")
    assert "1 missing (transformer.encoder.layers.1.linear1.bias)" in message
    assert "1 unexpected (transformer.decoder.layers.0.extra.weight)" in message
    assert (
        "1 mis-shaped (transformer.decoder.layers.1.linear2.weight [32, 48] in file, [32, 64] in model)"
        in message
    )


def test_ddetr_checkpoint_whose_config_disagrees_with_its_weights(hf_models, tmp_path):
    hf_models["plain"].save_pretrained(tmp_path / "hf")
    payload = model_checkpoint(load_model(tmp_path / "hf"))
    payload["config"]["dim_feedforward"] = 128
    torch.save(payload, tmp_path / "ddetr.pth")
    expect_error(tmp_path / "ddetr.pth", "mis-shaped")
    payload["config"]["no_such_field"] = 1
    torch.save(payload, tmp_path / "ddetr.pth")
    expect_error(tmp_path / "ddetr.pth", "no_such_field")


def test_hub_style_config_json(hf_models, references, batch, tmp_path):
    """config.json as the published SenseTime checkpoints have it (transformers 4.x: no
    backbone_config, `backbone` + `use_timm_backbone` at the top, COCO-style id2label)."""
    import json

    hf_models["plain"].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["backbone_config"]
    names = ["N/A", "person", "bicycle", "car", "motorcycle"]
    config.update(
        backbone="resnet18",
        use_timm_backbone=True,
        use_pretrained_backbone=True,
        id2label={str(i): n for i, n in enumerate(names)},
        label2id={n: i for i, n in enumerate(names)},
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(tmp_path)
    assert model.config.backbone == "resnet18" and model.config.class_names == names
    assert_matches(model, references["plain"], *batch)


def test_unsupported_hugging_face_config(hf_models, tmp_path):
    hf = hf_models["plain"]
    hf.save_pretrained(tmp_path)
    import json

    config = json.loads((tmp_path / "config.json").read_text())
    config["position_embedding_type"] = "learned"
    (tmp_path / "config.json").write_text(json.dumps(config))
    expect_error(tmp_path, "position_embedding_type")
