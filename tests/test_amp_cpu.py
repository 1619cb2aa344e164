"""Mixed precision (`--amp fp16|bf16`) through train, eval, predict and bench, run on the CPU.

These are the code paths a GPU user takes with --amp; torch's CPU autocast supports both dtypes
(and GradScaler("cpu") the fp16 loss scaling), so they are proven here without a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import ddetr
from model_helpers import one_thread as one_thread
from model_helpers import tiny_config
from test_cli_train import train_args

from ddetr_cli import runs
from ddetr_cli.engine.benchmark import bench
from ddetr_cli.engine.inference import TorchDetector
from ddetr_cli.model import build_model, model_checkpoint


@pytest.fixture(scope="module")
def fp16_run(synthetic_coco, tmp_path_factory):
    project = tmp_path_factory.mktemp("amp")
    result = ddetr(*train_args(synthetic_coco, project, "fp16", epochs=1), "--amp", "fp16")
    assert result.exit_code == 0, result.output
    return project / "fp16"


def test_train_fp16_scales_the_loss_and_saves_the_scaler(fp16_run):
    ckpt = torch.load(fp16_run / "weights" / "last.pt", weights_only=True)
    assert ckpt["train_args"]["settings"]["amp"] == "fp16"
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    losses = [json.loads(line)["loss"] for line in (fp16_run / "train_log.jsonl").read_text().splitlines()]
    assert losses and all(map(lambda v: v == v and abs(v) < 1e4, losses))


def test_train_bf16_resumes_without_a_scaler(synthetic_coco, tmp_path):
    result = ddetr(*train_args(synthetic_coco, tmp_path, "bf16", epochs=1), "--amp", "bf16")
    assert result.exit_code == 0, result.output
    assert torch.load(tmp_path / "bf16" / "weights" / "last.pt", weights_only=True)["scaler"] is None
    result = ddetr("train", "--resume", tmp_path / "bf16" / "weights" / "last.pt", "--epochs", "2")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("amp, tolerance", [("bf16", 0.1), ("fp16", 0.02)])
def test_detector_under_amp_is_close_to_fp32(amp, tolerance):
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    images, mask = torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)
    sizes = torch.tensor([[64, 96], [64, 96]])
    full = TorchDetector(model, torch.device("cpu"))(images, mask, sizes)
    mixed = TorchDetector(model, torch.device("cpu"), amp)(images, mask, sizes)
    diff = max((f["scores"] - m["scores"].float()).abs().max().item() for f, m in zip(full, mixed))
    assert 0 < diff < tolerance  # autocast really ran (not bit-equal), and stayed close


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_eval_and_predict_with_amp(fp16_run, synthetic_coco, tmp_path, amp):
    weights = fp16_run / "weights" / "last.pt"
    result = ddetr(
        "eval", "--weights", weights, "--data", synthetic_coco, "--amp", amp, "--out", tmp_path / "m.json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.json").read_text())["images"] == 4
    out = tmp_path / "p.json"
    result = ddetr(
        "predict", synthetic_coco / "val", "-w", weights, "--amp", amp, "--score-thr", "0", "--out", out
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())


def test_bench_with_amp(tmp_path):
    config = tiny_config()
    weights = runs.atomic_save(model_checkpoint(build_model(config)), tmp_path / "w.pt")
    report = bench(weights=weights, imgsz="64x96", device="cpu", amp="bf16", warmup=0, iters=2, show=False)
    assert report["amp"] == "bf16" and report["images_per_s"] > 0
