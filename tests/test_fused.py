"""The fused inference copy (ddetr_cli.model.fused) computes what the model computes, to float rounding."""

from __future__ import annotations

import pytest
import torch
from hf_reference import randomise
from model_helpers import one_thread as one_thread  # autouse: one intra-op thread
from model_helpers import tiny_config

from ddetr_cli.model import build_model, postprocess
from ddetr_cli.model.fused import fuse_for_inference
from ddetr_cli.model.fused_resnet import FusedBlock, pointwise_available

# Folded BatchNorms and NHWC convolutions round differently (the randomised ResNet's maps reach
# hundreds); nothing else moves. The same bound as the checkpoint tests against Hugging Face.
ATOL = 1e-4


def padded_batch(height: int = 64, width: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images; the second valid on its top-left part only."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, height, width, generator=g)
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    mask[1, height - 16 :] = True
    mask[1, :, width - 24 :] = True
    return images.masked_fill(mask[:, None], 0.0), mask


@pytest.fixture(scope="module", params=["tiny", "resnet18", "resnet50"])
def models(request):
    """(model, fused copy) with every weight and BatchNorm statistic randomised."""
    torch.manual_seed(0)
    model = build_model(tiny_config(backbone=request.param, num_queries=20)).eval()
    randomise(model)
    return model, fuse_for_inference(model)


@pytest.mark.parametrize("padded", [False, True])
def test_fused_copy_gives_the_models_outputs(models, padded):
    model, fused = models
    images, mask = padded_batch()
    if not padded:
        mask = torch.zeros_like(mask)
    with torch.inference_mode():
        want, got = model(images, mask), fused(images, mask)
        again = fused(images, mask)  # from the caches
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0)
        torch.testing.assert_close(again[key], got[key], atol=0, rtol=0)
    assert "aux_outputs" in want and "aux_outputs" not in got  # only the last layer is computed
    sizes = torch.tensor([[480, 600], [300, 400]])
    for a, b in zip(postprocess(got, sizes), postprocess(want, sizes)):
        torch.testing.assert_close(a["scores"], b["scores"], atol=ATOL, rtol=0)


def test_caches_follow_the_input_size(models):
    """A new size is computed, not served from another size's cache."""
    model, fused = models
    for height, width in ((64, 80), (96, 64), (64, 80)):
        images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(height))
        mask = torch.zeros(1, height, width, dtype=torch.bool)
        with torch.inference_mode():
            torch.testing.assert_close(
                fused(images, mask)["pred_boxes"], model(images, mask)["pred_boxes"], atol=ATOL, rtol=0
            )


def test_original_untouched_and_backbone_fused(models):
    model, fused = models
    assert fused.fused_for_inference and not hasattr(model, "fused_for_inference")
    assert fuse_for_inference(fused) is fused
    assert not any("running_var" in key for key in fused.state_dict())  # all folded
    blocks = [m for m in fused.modules() if isinstance(m, FusedBlock)]
    if model.config.backbone == "tiny":
        assert not blocks
    elif pointwise_available():
        body = model.backbone[0].body
        assert len(blocks) == sum(len(getattr(body, f"layer{i}")) for i in range(1, 5))


def test_thread_setting_restored(models):
    """The decoder runs on one thread and gives the setting back, also when it fails."""
    _, fused = models
    images, mask = padded_batch()
    torch.set_num_threads(2)
    try:
        seen = []
        hook = fused.transformer.decoder.layers[0].register_forward_hook(
            lambda *_: seen.append(torch.get_num_threads())
        )
        with torch.inference_mode():
            fused(images, mask)
        hook.remove()
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(IndexError), torch.inference_mode():  # zero-dim inputs
            fused.transformer.decoder(*[torch.zeros(1)] * 8)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_trainable_batchnorm_backbone_is_left_unfused():
    """With trainable BatchNorm (frozen_bn off) nothing is folded, and the outputs still agree."""
    torch.manual_seed(0)
    model = build_model(tiny_config(backbone="resnet18", frozen_bn=False)).eval()
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, FusedBlock) for m in fused.modules())
    images, mask = padded_batch()
    with torch.inference_mode():
        torch.testing.assert_close(fused(images, mask)["pred_logits"], model(images, mask)["pred_logits"])


@pytest.mark.parametrize("variant", [dict(with_box_refine=True), dict(with_box_refine=True, two_stage=True)])
def test_refining_variants(variant):
    """Box refinement (per-layer heads inside the decoder) and two-stage proposals survive fusion."""
    torch.manual_seed(0)
    model = build_model(tiny_config(backbone="resnet18", num_queries=20, **variant)).eval()
    randomise(model)
    images, mask = padded_batch()
    fused = fuse_for_inference(model)
    with torch.inference_mode():
        want, got = model(images, mask), fused(images, mask)
    if "enc_outputs" not in want:
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0)
        return
    # Two-stage: proposals whose scores tie to float noise may be taken in either order (see
    # tests/test_checkpoints.py), so compare the proposal scores and the sorted detections.
    torch.testing.assert_close(
        got["enc_outputs"]["pred_logits"], want["enc_outputs"]["pred_logits"], atol=ATOL, rtol=0
    )
    sizes = torch.tensor([[64, 80], [64, 80]])
    for a, b in zip(postprocess(got, sizes), postprocess(want, sizes)):
        torch.testing.assert_close(a["scores"], b["scores"], atol=ATOL, rtol=0)
