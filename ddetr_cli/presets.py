"""Named bundles of model and training settings.

`tiny`: the embedded default behind `ddetr demo`. It keeps the paper's architecture (a CNN's
multi-scale features plus one extra strided level, multi-scale deformable attention in encoder and
decoder, focal loss, Hungarian matching with the paper's costs, auxiliary losses, iterative box
refinement, two-stage proposals) and shrinks everything else so that it trains from scratch on a
CPU in minutes: a small from-scratch CNN backbone, narrow and shallow transformer, 100 queries and
images of about 192 px. Two-stage matters most for short schedules: in the tuning runs
(benchmarks/demo_tuning.py, 400 images, batch 8, lr 1e-3) it reached AP50 0.08 / 0.15 / 0.22 after
200 / 400 / 600 iterations against 0.02 for box refinement alone after 200; lr 2e-3 and batch 4
were worse, 100 queries slightly better than 50. The augmentation mattered as much: at 750
iterations (600 images), AP50 went 0.28 (official: crops half the time, shorter side 0.6..1.0 of the
evaluation size) -> 0.32 (no crops) -> 0.38 (no crops, shorter side 0.8..1.0); the full 20 epochs
of the last reached AP 0.38 / AP50 0.55.

Each preset is a dict with
    "model": overrides of `DeformableDetrConfig` fields (num_classes etc. come from the data);
    "train": training-command settings (epochs, lr, batch size, image scales, ...);
    "data":  the synthetic dataset the demo generates (`ddetr_cli.synth.make_synthetic_coco`).
"""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "model": {
            "backbone": "tiny",
            "num_feature_levels": 4,
            "hidden_dim": 64,
            "nheads": 4,
            "enc_layers": 2,
            "dec_layers": 2,
            "dim_feedforward": 256,
            "dropout": 0.0,
            "enc_n_points": 4,
            "dec_n_points": 4,
            "num_queries": 100,
            "with_box_refine": True,
            "two_stage": True,
            "aux_loss": True,
        },
        "train": {
            "epochs": 21,
            "batch_size": 8,
            "lr": 1e-3,
            "lr_backbone": 1e-3,  # the tiny CNN learns from scratch: no reason to hold it back
            "weight_decay": 1e-4,
            "lr_drop": 17,
            "clip_max_norm": 0.1,
            # Shorter sides 0.8..1.0 of the evaluation size and no random crops: for a 20-epoch run
            # on 600 images the paper's wide jitter (480..800 = 0.6..1.0) and crops cost more than
            # they regularise (crops cut the large shapes apart). See the module docstring.
            "scales": [154, 160, 166, 173, 179, 186, 192],
            "max_size": 320,
            "val_size": 192,
            "crop_prob": 0.0,
            # The paper's crop sizes scaled by 192/800, for runs that turn crops back on.
            "crop_resize": [96, 120, 144],
            "crop_size": [92, 144],
            "eval_interval": 5,
        },
        "data": {"num_train": 600, "num_val": 100, "image_size": [160, 224], "objects_per_image": [2, 6]},
    },
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> dict[str, dict[str, Any]]:
    """A deep copy of preset `name` (callers may modify it); ValueError naming the choices otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    return copy.deepcopy(PRESETS[name])
