"""The recipe summary `ddetr train` prints before the first step (and writes to args.yaml): the lines
a reviewer checks before trusting a run.

    Recipe
      model      two-stage Deformable DETR, resnet50, 6+6 layers, 300 queries, 80 classes
      backbone   torchvision ResNet50_Weights.IMAGENET1K_V1 (.../resnet50-0676ba61.pth, sha256 0676ba61cb3f)
      trainable  39.85M parameters (backbone: stem and layer1 frozen, FrozenBatchNorm2d)
      lr groups  main 2e-04 (15.7M), backbone 2e-05 (23.5M), linear_proj 2e-05 (0.7M)
      schedule   50 epochs, lr x0.1 after epoch 40, AdamW weight decay 1e-04, grad clip 0.1
      batch      2 per device x 8 devices = 16
      AMP        off
"""

from __future__ import annotations

from ddetr_cli.console import console


def training_recipe(model, settings: dict, optimizer, world_size: int, backbone_weights: dict | None) -> dict:
    """The run's recipe as plain types (args.yaml's `recipe`)."""
    config = model.config
    variant = "two-stage" if config.two_stage else ("box-refine" if config.with_box_refine else "plain")
    groups = {}
    for group in optimizer.param_groups:
        name = group.get("name", f"group{len(groups)}")
        groups[name] = {"lr": float(group["lr"]), "parameters": sum(p.numel() for p in group["params"])}
    return {
        "variant": variant,
        "backbone": config.backbone,
        "backbone_weights": _describe_weights(backbone_weights),
        "frozen": _frozen(model),
        "layers": f"{config.enc_layers}+{config.dec_layers}",
        "queries": config.num_queries,
        "classes": config.num_classes,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lr_groups": groups,
        "epochs": int(settings["epochs"]),
        "lr_drop": int(settings["lr_drop"]),
        "weight_decay": float(settings["weight_decay"]),
        "clip_max_norm": float(settings["clip_max_norm"]),
        "batch_per_device": int(settings["batch_size"]),
        "devices": int(world_size),
        "amp": settings["amp"],
    }


def recipe_lines(r: dict) -> list[tuple[str, str]]:
    """(label, text) rows of the printed summary."""
    groups = r["lr_groups"].items()
    lr_groups = ", ".join(f"{k} {g['lr']:.0e} ({g['parameters'] / 1e6:.1f}M)" for k, g in groups)
    frozen = f" ({r['frozen']})" if r["frozen"] else ""
    return [
        (
            "model",
            f"{r['variant']} Deformable DETR, {r['backbone']}, {r['layers']} layers, {r['queries']} queries, "
            f"{r['classes']} classes",
        ),
        ("backbone", f"{r['backbone']} from {r['backbone_weights']}"),
        ("trainable", f"{r['trainable_parameters'] / 1e6:.2f}M parameters{frozen}"),
        ("lr groups", lr_groups),
        (
            "schedule",
            f"{r['epochs']} epochs, lr x0.1 after epoch {r['lr_drop']}, AdamW weight decay "
            f"{r['weight_decay']:.0e}, grad clip {r['clip_max_norm']:g}",
        ),
        (
            "batch",
            f"{r['batch_per_device']} per device x {r['devices']} device(s) = "
            f"{r['batch_per_device'] * r['devices']}",
        ),
        ("AMP", str(r["amp"])),
    ]


def print_recipe(r: dict) -> None:
    console.print("Recipe", style="bold")
    for label, text in recipe_lines(r):
        console.print(f"  {label:<10} {text}", highlight=False, markup=False, soft_wrap=True)


def _describe_weights(record: dict | None) -> str:
    if record is None:
        return "random initialisation"
    if "sha256" in record:
        return f"{record['source']} ({record['file']}, sha256 {record['sha256']})"
    return f"{record['source']} {record['file']}"


def _frozen(model) -> str:
    """What of the CNN is frozen, read off the model (not assumed)."""
    from ddetr_cli.model.backbone import FrozenBatchNorm2d

    cnn = model.backbone[0]
    parts = []
    frozen_stages = [
        name
        for name, module in cnn.body.named_children()
        if any(True for _ in module.parameters()) and not any(p.requires_grad for p in module.parameters())
    ]
    if frozen_stages:
        stem = ["stem"] if "conv1" in frozen_stages else []  # torchvision's stem: conv1, bn1
        names = stem + [n for n in frozen_stages if n not in ("conv1", "bn1")]
        parts.append(f"backbone: {' and '.join(names)} frozen")
    if any(isinstance(m, FrozenBatchNorm2d) for m in cnn.modules()):
        parts.append("FrozenBatchNorm2d")
    return ", ".join(parts)
