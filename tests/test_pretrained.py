"""Starting weights without a network: the ImageNet backbone from torchvision's cache (TORCH_HOME),
detector weights by Hugging Face Hub id from huggingface_hub's cache (HF_HOME, HF_HUB_OFFLINE=1),
and class-head rows carried over by class name when fine-tuning.

The caches are real layouts in temporary folders, filled with randomly initialised weights under
the exact names the libraries look for; every run sets the offline switch so nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision
import yaml
from cli_helpers import ddetr, error_line
from model_helpers import one_thread as one_thread  # autouse: one intra-op thread
from model_helpers import tiny_config

from ddetr_cli.model import build_model, param_groups
from ddetr_cli.model.checkpoint import read_checkpoint

PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)
# ResNet-18 under a small transformer; tiny images. ImageNet lookups need a ResNet.
RESNET_RUN = [
    "--backbone",
    "resnet18",
    "--hidden-dim",
    "32",
    "--enc-layers",
    "1",
    "--dec-layers",
    "1",
    "--num-queries",
    "10",
    "--imgsz",
    "64",
    "--workers",
    "1",
    "--epochs",
    "1",
    "--device",
    "cpu",
]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty TORCH_HOME and HF_HOME under tmp_path, and the ecosystem's offline switch on."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.fixture(scope="module")
def small_coco(tmp_path_factory):
    """2 train / 2 val images of 64..96 px (the synthetic shapes: circle, square, ...)."""
    from ddetr_cli.synth import make_synthetic_coco

    return make_synthetic_coco(
        tmp_path_factory.mktemp("small_coco"), num_train=2, num_val=2, image_size=(64, 96), seed=0
    )


def imagenet_cache_file(torch_home) -> os.PathLike:
    """A random ResNet-18 state dict where torchvision caches IMAGENET1K_V1 (the name from its URL)."""
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    path = torch_home / "hub" / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True)
    torch.manual_seed(123)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


# -- the ImageNet backbone ----------------------------------------------------------------------


def test_train_loads_the_cached_imagenet_backbone(offline, small_coco):
    cached = imagenet_cache_file(offline / "torch")
    project = offline / "runs"
    # --lr-backbone 0: the backbone's tensors stay the loaded ones, so the checkpoint shows them.
    result = ddetr("train", "--data", small_coco, "--project", project, "--lr-backbone", "0", *RESNET_RUN)
    assert result.exit_code == 0, result.output
    expected = torch.load(cached, weights_only=True)
    model = torch.load(project / "exp" / "weights" / "last.pt", weights_only=True)["model"]
    body = {k[len("backbone.0.body.") :]: v for k, v in model.items() if k.startswith("backbone.0.body.")}
    assert body and set(body) <= set(expected)
    for name, tensor in body.items():
        assert torch.equal(tensor, expected[name]), name

    args = yaml.safe_load((project / "exp" / "args.yaml").read_text())
    sha = hashlib.sha256(cached.read_bytes()).hexdigest()[:12]
    assert args["start"]["backbone"] == {
        "source": "torchvision ResNet18_Weights.IMAGENET1K_V1",
        "file": str(cached),
        "sha256": sha,
    }
    output = " ".join(result.output.split())
    assert "differs from the f37072fd in its name" in output  # random weights, not the published file
    assert (
        f"backbone resnet18 from torchvision ResNet18_Weights.IMAGENET1K_V1 ({cached}, sha256 {sha})"
        in output
    )

    # --resume takes the backbone from the checkpoint: no ImageNet file needed.
    cached.unlink()
    result = ddetr("train", "--resume", project / "exp" / "weights" / "last.pt", "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert torch.load(project / "exp" / "weights" / "last.pt", weights_only=True)["epoch"] == 2


def test_offline_without_the_file_is_one_line_and_no_run_directory(offline, small_coco):
    project = offline / "runs"
    result = ddetr("train", "--data", small_coco, "--project", project, *RESNET_RUN)
    assert result.exit_code != 0
    line = error_line(result)
    cache = offline / "torch" / "hub" / "checkpoints"
    assert f"resnet18-f37072fd.pth are not in {cache}" in line and "HF_HUB_OFFLINE" in line
    assert "--pretrained-backbone PATH" in line and "--pretrained-backbone none" in line
    assert not project.exists()


def test_offline_without_the_file_under_torchrun(offline, small_coco):
    """Two processes: the main one looks, both exit with the line (neither waits for the other)."""
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    project = offline / "runs"
    args = ["train", "--data", small_coco, "--project", project, "--batch-size", "1", *RESNET_RUN]
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "ddetr_cli.cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2 and all("resnet18-f37072fd.pth are not in" in e for e in errors), proc.stderr
    assert not project.exists()


def test_failed_download_is_one_line(monkeypatch, tmp_path):
    """Online, but the network is unreachable (a proxy that refuses): the download fails at once."""
    from ddetr_cli.model.pretrained import PretrainedWeightsError, resolve_backbone_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    with pytest.raises(PretrainedWeightsError) as err:
        resolve_backbone_weights("resnet18", None)
    message = str(err.value)
    assert "\n" not in message
    assert "downloading https://download.pytorch.org/models/resnet18-f37072fd.pth failed" in message
    assert not any((tmp_path / "torch" / "hub" / "checkpoints").glob("resnet18*.pth"))


def test_backbone_choices(offline):
    """A local file is recorded as such; `none` and the tiny backbone need nothing; ImageNet for tiny
    is an error, not a silent no-op."""
    from ddetr_cli.model.pretrained import PretrainedWeightsError, resolve_backbone_weights

    cached = imagenet_cache_file(offline / "torch")
    local = offline / "r18.pth"
    shutil.copyfile(cached, local)
    record = resolve_backbone_weights("resnet18", str(local))
    assert record == {
        "source": "file",
        "file": str(local),
        "sha256": hashlib.sha256(local.read_bytes()).hexdigest()[:12],
    }
    assert resolve_backbone_weights("resnet18", "imagenet")["file"] == str(cached)
    assert resolve_backbone_weights("resnet18", "None") is None
    assert resolve_backbone_weights("tiny", None) is None
    with pytest.raises(PretrainedWeightsError, match="no ImageNet weights for 'tiny'"):
        resolve_backbone_weights("tiny", "imagenet")
    with pytest.raises(PretrainedWeightsError, match="no such file"):
        resolve_backbone_weights("resnet18", str(offline / "missing.pth"))


def test_pretrained_backbone_none_trains_from_scratch_with_a_warning(offline, small_coco):
    project = offline / "runs"
    result = ddetr(
        "train", "--data", small_coco, "--project", project, "--pretrained-backbone", "none", *RESNET_RUN
    )
    assert result.exit_code == 0, result.output
    assert "paper's numbers need ImageNet-pretrained weights" in " ".join(result.stderr.split())
    args = yaml.safe_load((project / "exp" / "args.yaml").read_text())
    assert args["start"]["backbone"] is None
    assert args["model"]["pretrained_backbone"] is None
    recipe = args["recipe"]
    assert recipe["backbone_weights"] == "random initialisation"
    assert recipe["frozen"] == "backbone: stem and layer1 frozen, FrozenBatchNorm2d"
    assert recipe["lr_groups"]["backbone"]["lr"] == pytest.approx(2e-5)
    assert recipe["trainable_parameters"] == sum(g["parameters"] for g in recipe["lr_groups"].values())
    printed = " ".join(result.stdout.split())
    for line in (
        "Recipe model plain Deformable DETR, resnet18, 1+1 layers, 10 queries, 5 classes",
        "backbone resnet18 from random initialisation",
        "lr groups main 2e-04",
        "schedule 1 epochs, lr x0.1 after epoch 40, AdamW weight decay 1e-04, grad clip 0.1",
        "batch 2 per device x 1 device(s) = 2 AMP off",
    ):
        assert line in printed, line


def test_tiny_backbone_needs_no_imagenet_file(offline, small_coco):
    project = offline / "runs"
    result = ddetr("train", "--data", small_coco, "--project", project, *RESNET_RUN, "--backbone", "tiny")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((project / "exp" / "args.yaml").read_text())["start"]["backbone"] is None


def test_trainable_parameters_follow_the_official_rule():
    """Official backbone.py: only names with layer2/3/4 train, FrozenBatchNorm2d (no BN parameters),
    and main.py puts `backbone.0` at lr_backbone and reference points/sampling offsets at lr/10."""
    model = build_model(tiny_config(backbone="resnet18"))
    reference = torchvision.models.resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d)
    official = {
        f"backbone.0.body.{n}"
        for n, _ in reference.named_parameters()
        if not n.startswith("fc.") and any(f"layer{i}" in n for i in (2, 3, 4))
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("backbone.")} == official
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    groups = {g["name"]: g for g in param_groups(model, lr=2e-4, lr_backbone=2e-5)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups["backbone"]["params"]} == official
    assert groups["backbone"]["lr"] == 2e-5 and groups["linear_proj"]["lr"] == pytest.approx(2e-5)
    assert all(
        "sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)]
        for p in groups["linear_proj"]["params"]
    )


# -- detector weights by Hub id -----------------------------------------------------------------


def hub_cache(hf_home, repo_id: str, checkpoint_dir, commit: str = "a" * 40) -> str:
    """huggingface_hub's cache layout for `repo_id` at `commit` (= refs/main) holding the files of
    `checkpoint_dir`: blobs named by sha256, snapshot files as relative symlinks to them."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in checkpoint_dir.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return commit


@pytest.fixture
def hf_checkpoint(tmp_path):
    """A tiny two-stage HF model saved by transformers' save_pretrained, with named classes."""
    from hf_reference import hf_model

    labels = ["square", "person", "circle", "car", "dog"]
    hf = hf_model(
        "two_stage", seed=4, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    hf.save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def test_weights_by_hub_id_from_the_offline_cache(offline, hf_checkpoint, monkeypatch):
    from ddetr_cli.engine.inference import load_weights
    from ddetr_cli.model import load_model

    commit = hub_cache(offline / "hf", "SenseTime/tiny-ddetr", hf_checkpoint)
    reference = load_model(hf_checkpoint).state_dict()
    for spec in ("SenseTime/tiny-ddetr", f"SenseTime/tiny-ddetr@{commit}", "SenseTime/tiny-ddetr@main"):
        state = load_weights(spec, "cpu").state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), spec

    # A local path always wins over an id of the same spelling.
    monkeypatch.chdir(offline)
    local = offline / "SenseTime" / "tiny-ddetr"
    local.parent.mkdir()
    shutil.copytree(hf_checkpoint, local)
    (local / "config.json").write_text(
        json.dumps({**json.loads((local / "config.json").read_text()), "num_labels": 5, "id2label": {}})
    )
    assert load_weights("SenseTime/tiny-ddetr", "cpu").config.class_names is None


def test_hub_id_not_cached_offline_is_one_line(offline, small_coco):
    result = ddetr("eval", "--weights", "SenseTime/not-cached@v2", "--data", small_coco, "--device", "cpu")
    assert result.exit_code != 0
    line = error_line(result)
    assert "SenseTime/not-cached@v2" in line and "HF_HUB_OFFLINE is set" in line
    assert str(offline / "hf" / "hub") in line
    result = ddetr("predict", small_coco / "val", "--weights", "runs/missing.pt", "--device", "cpu")
    assert "no such file or directory: runs/missing.pt" in error_line(result)  # a file name is no id


# -- class-head rows carried over by name -------------------------------------------------------


def class_heads(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("class_embed.")}


def test_finetune_by_hub_id_carries_matching_class_rows(offline, hf_checkpoint, small_coco):
    """HF id2label (square, person, circle, car, dog) -> the shapes data (circle, square, triangle,
    star, cross): circle and square keep their rows in every head (2 decoder layers + the two-stage
    encoder head), the others start from the prior. --lr 0 keeps the loaded values in last.pt."""
    hub_cache(offline / "hf", "org/coco-tiny", hf_checkpoint)
    project = offline / "runs"
    result = ddetr(
        "train",
        "--data",
        small_coco,
        "--project",
        project,
        "--weights",
        "org/coco-tiny",
        "--lr",
        "0",
        "--lr-backbone",
        "0",
        "--epochs",
        "1",
        "--imgsz",
        "64",
        "--workers",
        "1",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "2 of 5 classes keep coco-tiny's trained class-head rows: circle, square" in " ".join(
        result.output.split()
    )
    args = yaml.safe_load((project / "exp" / "args.yaml").read_text())
    assert args["start"]["class_transfer"]["carried"] == ["circle", "square"]
    assert args["start"]["class_transfer"]["initialised"] == ["triangle", "star", "cross"]

    _, source = read_checkpoint(hf_checkpoint)
    tuned = torch.load(project / "exp" / "weights" / "last.pt", weights_only=True)["model"]
    heads = class_heads(tuned)
    assert len([k for k in heads if k.endswith(".weight")]) == 3
    for key, rows in heads.items():
        assert torch.equal(rows[0], source[key][2]) and torch.equal(rows[1], source[key][0]), key
        for j in (2, 3, 4):
            assert not any(torch.equal(rows[j], source[key][i]) for i in range(5)), key
        if key.endswith(".bias"):
            assert rows[2:].tolist() == pytest.approx([PRIOR_BIAS] * 3)


def official_coco_checkpoint(path, **config):
    """An official-style .pth ({"model", "args"}) of a random 91-logit model: COCO by category id."""
    torch.manual_seed(7)
    model = build_model(tiny_config(num_classes=91, **config))
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):  # two-stage shares heads
            if name.startswith("class_embed."):
                p.normal_()
    torch.save({"model": model.state_dict(), "args": {"nheads": 2}}, path)
    return model.state_dict()


def test_official_coco_checkpoint_to_custom_classes(tmp_path):
    from ddetr_cli.model.class_transfer import load_for_finetuning

    source = official_coco_checkpoint(tmp_path / "coco.pth", with_box_refine=True, two_stage=True)
    names = ["Person", "zebra stripe", "car", "Traffic_Light"]
    model, report = load_for_finetuning(tmp_path / "coco.pth", names)
    assert report["carried"] == ["Person", "car", "Traffic_Light"]
    assert report["initialised"] == ["zebra stripe"]
    heads = class_heads(model.state_dict())
    assert len([k for k in heads if k.endswith(".weight")]) == 3  # 2 decoder layers + encoder head
    for key, rows in heads.items():
        for target, category_id in ((0, 1), (2, 3), (3, 10)):  # person, car, traffic light
            assert torch.equal(rows[target], source[key][category_id]), key
        assert not any(torch.equal(rows[1], source[key][i]) for i in range(91)), key
    # Everything else is the checkpoint's.
    state = model.state_dict()
    assert all(
        torch.equal(state[k], source[k])
        for k in state
        if not k.startswith(("class_embed.", "transformer.decoder.class_embed."))
    )


def test_no_coco_names_reinitialises_every_class(tmp_path):
    from ddetr_cli.model.class_transfer import load_for_finetuning

    source = official_coco_checkpoint(tmp_path / "coco.pth")
    model, report = load_for_finetuning(tmp_path / "coco.pth", ["circle", "square", "hexagon"])
    assert report["carried"] == [] and len(report["initialised"]) == 3
    for key, rows in class_heads(model.state_dict()).items():
        assert not any(torch.equal(row, src) for row in rows for src in source[key]), key
        if key.endswith(".bias"):
            assert rows.tolist() == pytest.approx([PRIOR_BIAS] * 3)


def test_raw_label_mapping_keeps_the_coco_heads(tmp_path):
    """--label-mapping raw (official COCO): 91 classes by category id, every row loaded as is."""
    from ddetr_cli.model.class_transfer import load_for_finetuning

    source = official_coco_checkpoint(tmp_path / "coco.pth")
    names = [f"class{i}" for i in range(91)]
    model, report = load_for_finetuning(tmp_path / "coco.pth", names, by_name=False)
    assert report is None
    for key, rows in class_heads(model.state_dict()).items():
        assert torch.equal(rows, source[key]), key
