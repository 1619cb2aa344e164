"""The one inference path: every command gets the same detections for the same image and weights."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import one_thread as one_thread
from model_helpers import tiny_config

from ddetr_cli import runs
from ddetr_cli.engine.evaluation import evaluate
from ddetr_cli.engine.prediction import predict
from ddetr_cli.model import build_model, model_checkpoint


def _tiny_weights(path, seed=0):
    torch.manual_seed(seed)
    config = tiny_config(num_classes=5, category_ids=[1, 2, 3, 5, 7], class_names=list("abcde"))
    return runs.atomic_save(model_checkpoint(build_model(config)), path)


def test_predict_and_eval_give_the_same_detections(synthetic_coco, tmp_path):
    """predict (a file list) and eval (a COCO split) preprocess alike: at the same batch size
    (one image a batch, predict's default) their detections are identical."""
    weights = _tiny_weights(tmp_path / "w.pt")
    ann = synthetic_coco / "annotations" / "instances_val.json"
    evaluate(
        weights=weights,
        data=str(synthetic_coco),
        out=None,
        save_detections=tmp_path / "det.json",
        batch_size=1,
        imgsz=96,
        device="cpu",
        show=False,
    )
    images = sorted(str(p) for p in (synthetic_coco / "val").glob("*.jpg"))
    predicted = predict(images, weights, out=None, ann=ann, score_thr=0.0, imgsz=96, device="cpu")

    def keyed(dets):
        return sorted((d["image_id"], d["category_id"], tuple(d["bbox"]), d["score"]) for d in dets)

    evaluated = json.loads((tmp_path / "det.json").read_text())
    assert len(evaluated) == len(predicted) > 0
    assert keyed(evaluated) == keyed(predicted)


def test_eval_predict_and_bench_through_onnx_equal_pytorch(synthetic_coco, tmp_path):
    """`--weights model.onnx` (exported --dynamic --input normalized) gives the .pt's numbers."""
    pytest.importorskip("onnxruntime")
    from ddetr_cli.engine.benchmark import bench
    from ddetr_cli.engine.export import export_onnx

    weights = _tiny_weights(tmp_path / "w.pt", seed=3)
    onnx_file = export_onnx(
        weights, tmp_path / "w.onnx", imgsz=(96, 128), dynamic=True, input_form="normalized"
    )
    common = dict(data=str(synthetic_coco), out=None, batch_size=3, imgsz=96, device="cpu", show=False)
    from_pt = evaluate(weights=weights, save_detections=tmp_path / "pt.json", **common)
    from_onnx = evaluate(weights=onnx_file, save_detections=tmp_path / "onnx.json", **common)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"):
        assert from_onnx[key] == pytest.approx(from_pt[key], abs=1e-4), key

    images = sorted(str(p) for p in (synthetic_coco / "val").glob("*.jpg"))
    args = dict(out=None, score_thr=0.0, imgsz=96, device="cpu")
    pt_dets, onnx_dets = predict(images, weights, **args), predict(images, onnx_file, **args)
    assert len(pt_dets) == len(onnx_dets) > 0
    for a, b in zip(pt_dets, onnx_dets):
        assert a["category_id"] == b["category_id"] and a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=0.02)  # both rounded to 0.01 px

    report = bench(weights=onnx_file, imgsz="96x128", device="cpu", warmup=0, iters=2, show=False)
    assert report["msda_backend"] == "onnxruntime" and report["images_per_s"] > 0
