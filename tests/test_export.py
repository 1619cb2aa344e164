"""`ddetr export` to ONNX and OnnxDetector: onnxruntime's detections against the PyTorch model's.

Tolerances (issue #13): same labels, scores within 1e-4, boxes within 1e-3 px after matching each
ONNX detection to the PyTorch detection of the same label nearest in score.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from cli_helpers import ddetr, error_line
from model_helpers import one_thread as one_thread
from model_helpers import tiny_config

from ddetr_cli.engine.export import MEAN, STD, export_onnx, valid_sizes
from ddetr_cli.model import build_model, model_checkpoint, postprocess
from ddetr_cli.model.config import DeformableDetrConfig

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

VARIANTS = {
    "plain": {},
    "box-refine": {"with_box_refine": True},
    "two-stage": {"with_box_refine": True, "two_stage": True},
}
CATEGORY_IDS = [1, 2, 3, 5, 7]
CLASS_NAMES = ["circle", "square", "triangle", "star", "cross"]
SCORE_TOL, BOX_TOL = 1e-4, 1e-3
HALF_SCORE_TOL, HALF_BOX_TOL = 2e-3, 0.25  # --half on 64x96 inputs (measured: scores <= 3e-4)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights at sane scales, so that scores and boxes differ between queries and classes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.parameters():
            if t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
            else:
                t.add_(torch.randn(t.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (model, path of its ddetr .pt), each built on first use."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            torch.manual_seed(0)
            overrides = VARIANTS[variant]
            config = tiny_config(**overrides, class_names=CLASS_NAMES, category_ids=CATEGORY_IDS)
            model = build_model(config).eval()
            randomise(model, seed=len(variant))
            path = tmp_path_factory.mktemp(variant) / "tiny.pt"
            torch.save(model_checkpoint(model), path)
            cache[variant] = model, path
        return cache[variant]

    return get


@pytest.fixture(params=list(VARIANTS))
def checkpoint(request, checkpoints):
    """(variant, model, path of its ddetr .pt) for every variant."""
    return (request.param, *checkpoints(request.param))


def batch_inputs(sizes: list[tuple[int, int]], seed: int = 0):
    """Zero-padded uint8 pixels [B, 3, H, W], their loader-style normalisation and the mask."""
    g = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixels = torch.zeros(len(sizes), 3, height, width, dtype=torch.uint8)
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :, :h, :w] = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        mask[i, :h, :w] = False
    # As the loaders: (x / 255 - mean) / std in float64, then float32; zeros on padding.
    mean, std = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
    images = ((pixels.double() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).float()
    return pixels, images.masked_fill(mask[:, None], 0.0), mask


def pytorch_detections(model, images, mask, target_sizes, topk=100):
    with torch.no_grad():
        return postprocess(model(images, mask), target_sizes, topk=topk)


def run_onnx(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


def assert_same_detections(
    expected: list[dict],
    scores,
    labels,
    boxes,
    category_ids=CATEGORY_IDS,
    score_tol=SCORE_TOL,
    box_tol=BOX_TOL,
):
    """ONNX outputs [B, K] / [B, K, 4] (labels as category ids) against postprocess's dicts."""
    assert len(expected) == scores.shape[0]
    for i, ref in enumerate(expected):
        assert scores.shape[1] == ref["scores"].shape[0]
        got_scores, got_labels, got_boxes = map(torch.as_tensor, (scores[i], labels[i], boxes[i]))
        torch.testing.assert_close(got_scores, ref["scores"], atol=score_tol, rtol=0)
        ref_labels = torch.tensor([category_ids[c] for c in ref["labels"].tolist()])
        # Near-equal scores may swap places: match each detection to the same-label one nearest in
        # score among those within tolerance, then compare boxes. The last ones may differ at the
        # top-k boundary, so only detections clearly above the k-th score are matched.
        kth = float(ref["scores"][-1])
        for score, label, box in zip(got_scores, got_labels, got_boxes):
            if score < kth + 2 * score_tol:
                continue
            candidates = (ref_labels == label) & ((ref["scores"] - score).abs() <= score_tol)
            assert candidates.any(), f"no PyTorch detection of category {int(label)} at score {float(score)}"
            box_error = (ref["boxes"][candidates] - box).abs().amax(1).min()
            assert box_error <= box_tol, f"box differs by {float(box_error)} px"


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic"])
def test_normalized_input_matches_pytorch(checkpoint, tmp_path, dynamic):
    """--input normalized: the PyTorch model's own input; fixed (batch 2, padded) and --dynamic
    (batch 1 at the export size, then batch 2 of another size with padding)."""
    variant, model, weights = checkpoint
    out = tmp_path / "model.onnx"
    batch = 1 if dynamic else 2
    export_onnx(weights, out, imgsz=(64, 96), batch=batch, dynamic=dynamic, input_form="normalized")
    cases = [[(64, 96)], [(96, 128), (70, 100)]] if dynamic else [[(64, 96), (48, 80)]]
    for sizes in cases:
        _, images, mask = batch_inputs(sizes, seed=len(sizes))
        expected = pytorch_detections(model, images, mask, valid_sizes(mask))
        assert_same_detections(expected, *run_onnx(out, images, mask))


@pytest.mark.parametrize(
    "variant, dynamic",
    [("plain", False), ("box-refine", False), ("two-stage", False), ("plain", True), ("two-stage", True)],
)
def test_uint8_input_matches_pytorch_on_the_same_pixels(checkpoints, tmp_path, variant, dynamic):
    """The default deployment form: uint8 pixels + valid sizes, normalisation and mask in the graph."""
    model, weights = checkpoints(variant)
    out = tmp_path / "model.onnx"
    export_onnx(weights, out, imgsz=(64, 96), batch=2, dynamic=dynamic, topk=30)
    sizes = [(64, 96), (50, 72)] if not dynamic else [(80, 112), (64, 100)]
    pixels, images, mask = batch_inputs(sizes, seed=3)
    pixels.masked_fill_(mask[:, None], 255)  # junk in the padding: the graph must ignore it
    valid = torch.tensor(sizes, dtype=torch.int64)
    expected = pytorch_detections(model, images, mask, valid, topk=30)
    assert_same_detections(expected, *run_onnx(out, pixels, valid))


def test_half(checkpoints, tmp_path):
    """--half (fp16 autocast in the graph) to the looser HALF_* tolerances, on onnxruntime's CPU.
    Two-stage: it holds every part of the other variants (plain and box-refine pass too)."""
    import onnx

    model, weights = checkpoints("two-stage")
    out = export_onnx(
        weights, tmp_path / "half.onnx", imgsz=(64, 96), batch=2, input_form="normalized", half=True
    )
    proto = onnx.load(str(out))
    fp16 = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert any("linear1" in name or "MatMul" in name for name in fp16), "no fp16 weights"
    _, images, mask = batch_inputs([(64, 96), (48, 80)], seed=2)
    expected = pytorch_detections(model, images, mask, valid_sizes(mask))
    scores, labels, boxes = run_onnx(out, images, mask)
    assert_same_detections(expected, scores, labels, boxes, score_tol=HALF_SCORE_TOL, box_tol=HALF_BOX_TOL)


@pytest.mark.parametrize("variant", ["two-stage"])
def test_metadata_round_trip(checkpoints, tmp_path, variant):
    """The file's metadata rebuilds the config; OnnxDetector reads it and gives what the PyTorch
    detector gives (both run each image of a padded batch at its own size)."""
    from ddetr_cli.engine.inference import TorchDetector
    from ddetr_cli.engine.onnx_detector import OnnxDetector

    model, weights = checkpoints(variant)
    out = tmp_path / "model.onnx"
    export_onnx(weights, out, imgsz=(64, 96), dynamic=True, input_form="normalized", topk=50)
    detector = OnnxDetector(out)
    assert detector.config == model.config
    meta = detector.metadata
    assert meta["variant"] == variant and meta["input_form"] == "normalized" and meta["topk"] == "50"
    assert json.loads(meta["class_names"]) == CLASS_NAMES
    assert json.loads(meta["category_ids"]) == CATEGORY_IDS
    assert meta["input_size"] == "dynamic" and meta["source_weights"] == str(weights)
    assert json.loads(meta["mean"]) == list(MEAN) and json.loads(meta["std"]) == list(STD)
    assert DeformableDetrConfig.from_dict(json.loads(meta["config"])) == model.config

    _, images, mask = batch_inputs([(64, 96), (40, 90)], seed=5)
    orig_sizes = torch.tensor([[480, 720], [300, 675]])
    expected = TorchDetector(model, torch.device("cpu"))(images, mask, orig_sizes, topk=20)
    got = detector(images, mask, orig_sizes, topk=20)
    for ref, det in zip(expected, got):
        assert det["labels"].dtype == torch.int64 and det["labels"].max() < model.config.num_classes
        assert torch.equal(det["labels"], ref["labels"])
        torch.testing.assert_close(det["scores"], ref["scores"], atol=SCORE_TOL, rtol=0)
        # Boxes scaled to 720 px from the 96 px input: the tolerance grows with the scale.
        torch.testing.assert_close(det["boxes"], ref["boxes"], atol=BOX_TOL * 10, rtol=0)


def test_onnx_detector_fixed_file_and_uint8_form(tmp_path):
    """A fixed-size uint8 file: a smaller batch is padded to its size and batch, then matches
    PyTorch on the same padded, re-quantised input; a larger image is a one-line error."""
    from ddetr_cli.console import UserError
    from ddetr_cli.engine.onnx_detector import OnnxDetector, to_uint8

    torch.manual_seed(0)
    model = build_model(tiny_config(category_ids=CATEGORY_IDS)).eval()
    randomise(model, seed=7)
    weights = tmp_path / "tiny.pt"
    torch.save(model_checkpoint(model), weights)
    out = export_onnx(weights, tmp_path / "fixed.onnx", imgsz=(64, 96), batch=2)
    detector = OnnxDetector(out)

    _, images, mask = batch_inputs([(56, 80)], seed=9)
    orig = torch.tensor([[56, 80]])
    got = detector(images, mask, orig)
    # What the detector fed the graph: the image padded to 64x96, quantised to uint8.
    padded = torch.zeros(1, 3, 64, 96)
    padded[:, :, :56, :80] = images
    padded_mask = torch.ones(1, 64, 96, dtype=torch.bool)
    padded_mask[:, :56, :80] = False
    pixels = to_uint8(padded, padded_mask)
    _, requantised, _ = batch_inputs([(64, 96)])  # only for the normalisation formula
    mean, std = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
    requantised = ((pixels.double() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).float()
    requantised = requantised.masked_fill(padded_mask[:, None], 0.0)
    expected = pytorch_detections(model, requantised, padded_mask, orig)
    assert len(got) == 1 and torch.equal(got[0]["labels"], expected[0]["labels"])
    torch.testing.assert_close(got[0]["scores"], expected[0]["scores"], atol=SCORE_TOL, rtol=0)
    torch.testing.assert_close(got[0]["boxes"], expected[0]["boxes"], atol=BOX_TOL, rtol=0)

    _, big, big_mask = batch_inputs([(72, 96)])
    with pytest.raises(UserError, match="does not fit the file's fixed 64x96 input"):
        detector(big, big_mask, torch.tensor([[72, 96]]))


def test_export_help():
    result = ddetr("export", "--help")
    assert result.exit_code == 0 and "Examples" in result.stdout and "ddetr export" in result.stdout


def test_export_command(checkpoints, tmp_path):
    """The CLI writes a loadable file with the asked-for shapes."""
    _, weights = checkpoints("plain")
    out = tmp_path / "cli.onnx"
    result = ddetr("export", "--weights", weights, "--out", out, "--imgsz", "64x96", "--batch", "2")
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
        ("images", "tensor(uint8)", [2, 3, 64, 96]),
        ("sizes", "tensor(int64)", [2, 2]),
    ]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [
        ("scores", [2, 60]),
        ("labels", [2, 60]),
        ("boxes", [2, 60, 4]),
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--imgsz", "64xabc"], "--imgsz must be HxW"),
        (["--opset", "13"], "--opset must be >= 16"),
    ],
)
def test_export_command_errors(checkpoints, tmp_path, args, message):
    _, weights = checkpoints("plain")
    result = ddetr("export", "--weights", weights, "--out", tmp_path / "m.onnx", *args)
    assert result.exit_code == 2
    assert message in error_line(result)
    assert not (tmp_path / "m.onnx").exists()


def test_export_command_missing_weights_and_missing_onnx(tmp_path, monkeypatch):
    result = ddetr("export", "--weights", tmp_path / "nope.pt", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2
    assert "no such file or directory" in error_line(result) and "nope.pt" in error_line(result)

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    result = ddetr("export", "--weights", tmp_path / "nope.pt", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2
    assert 'pip install "ddetr[export]"' in error_line(result)


def test_simplify_without_onnxsim(checkpoints, tmp_path, monkeypatch):
    _, weights = checkpoints("plain")
    monkeypatch.setitem(sys.modules, "onnxsim", None)  # as where onnxsim is not installed
    result = ddetr("export", "--weights", weights, "--out", tmp_path / "m.onnx", "--simplify")
    assert result.exit_code == 2
    assert "--simplify needs onnxsim: pip install onnxsim" in error_line(result)


def test_onnx_detector_rejects_foreign_files(tmp_path):
    from ddetr_cli.console import UserError
    from ddetr_cli.engine.onnx_detector import OnnxDetector

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    with pytest.raises(UserError, match="junk.onnx: onnxruntime cannot load it"):
        OnnxDetector(junk)
    with pytest.raises(UserError, match="no such file"):
        OnnxDetector(tmp_path / "missing.onnx")


@pytest.mark.slow
def test_full_size_r50_two_stage_from_official_pth(tmp_path):
    """The paper's R50 two-stage model (random weights), saved in the official .pth layout."""
    import argparse

    torch.manual_seed(0)
    model = build_model(DeformableDetrConfig(with_box_refine=True, two_stage=True)).eval()
    randomise(model, seed=11)
    weights = tmp_path / "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.pth"
    args = argparse.Namespace(nheads=8, num_queries=300, dilation=False, backbone="resnet50")
    torch.save({"model": model.state_dict(), "args": args}, weights)
    out = export_onnx(weights, tmp_path / "r50.onnx", imgsz=(256, 320), dynamic=True, input_form="normalized")

    _, images, mask = batch_inputs([(288, 352), (256, 300)], seed=13)
    expected = pytorch_detections(model, images, mask, valid_sizes(mask))
    assert_same_detections(expected, *run_onnx(out, images, mask), category_ids=list(range(91)))
