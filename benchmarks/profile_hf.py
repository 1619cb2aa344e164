"""Where inference time goes: ddetr and Hugging Face's `DeformableDetrForObjectDetection` under
`torch.profiler` (CPU), on the same weights and input, forward + post-processing.

    python benchmarks/profile_hf.py --imgsz 800x1066 --iters 2 [--top 15] [--markdown]

Prints, per side, milliseconds per image by stage (backbone, input projections, encoder, decoder,
heads, post-processing; the rest of the forward as "other") and the ops with the most self time.
A random R50 plain Deformable DETR (91 classes), batch 1, fp32, torch's thread setting.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch.autograd.profiler import record_function

from ddetr_cli.engine.hf_compare import HfDetector, ddetr_detector, hf_twin
from ddetr_cli.engine.inference import parse_imgsz
from ddetr_cli.model import DeformableDetrConfig, build_model
from ddetr_cli.model.fused import fuse_for_inference

STAGES = ("backbone", "input_proj", "encoder", "decoder", "heads", "postprocess")


def ddetr_stages(model) -> dict[str, list]:
    return {
        "backbone": [model.backbone],
        "input_proj": list(model.input_proj),
        "encoder": [model.transformer.encoder],
        "decoder": [model.transformer.decoder],
        "heads": [model.class_embed[0], model.bbox_embed[0]],  # shared in the plain model
    }


def hf_stages(twin) -> dict[str, list]:
    inner = twin.model
    return {
        "backbone": [inner.backbone],  # the conv model and its position encoding, as ours
        "input_proj": list(inner.input_proj),
        "encoder": [inner.encoder],
        "decoder": [inner.decoder],
        "heads": [twin.class_embed[0], twin.bbox_embed[0]],
    }


@contextlib.contextmanager
def labelled(stages: dict[str, list]):
    """Each stage module's forward inside a profiler range named `stage:<name>`."""
    handles, open_ranges = [], []
    for name, modules in stages.items():
        for module in modules:

            def enter(module, args, name=name):
                scope = record_function(f"stage:{name}")
                scope.__enter__()
                open_ranges.append(scope)

            def leave(module, args, output):
                open_ranges.pop().__exit__(None, None, None)

            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def profile(detect, stages, images, mask, sizes, iters: int):
    """(stage -> ms per call, forward + postprocess total ms per call, key_averages)."""
    detect(images, mask, sizes)  # warm-up
    with labelled(stages), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            with record_function("stage:total"):
                detect(images, mask, sizes)
    averages = prof.key_averages()
    inclusive = {
        e.key[len("stage:") :]: e.cpu_time_total / 1000 / iters
        for e in averages
        if e.key.startswith("stage:")
    }
    total = inclusive.pop("total")
    # Post-processing is what follows the model call: total minus the stages and the rest of the forward.
    return inclusive, total, averages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imgsz", default="800x1066")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    height, width = parse_imgsz(args.imgsz)
    torch.manual_seed(0)
    model = build_model(DeformableDetrConfig(backbone="resnet50", num_classes=91)).eval()
    twin = hf_twin(model)
    fused = fuse_for_inference(model)  # as `ddetr bench` runs it
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    sizes = torch.tensor([[height, width]])
    sides = {
        "ddetr": (ddetr_detector(fused), ddetr_stages(fused)),
        "hf": (HfDetector(twin), hf_stages(twin)),
    }
    results = {name: profile(d, s, images, mask, sizes, args.iters) for name, (d, s) in sides.items()}
    threads = torch.get_num_threads()
    print(f"## {height}x{width}, batch 1, fp32, {threads} threads, {args.iters} profiled calls\n")
    print("| stage | ddetr ms | hf ms | hf / ddetr |\n|---|---|---|---|")
    for stage in (*STAGES[:-1], "total"):
        ours = results["ddetr"][1] if stage == "total" else results["ddetr"][0].get(stage, 0.0)
        theirs = results["hf"][1] if stage == "total" else results["hf"][0].get(stage, 0.0)
        print(f"| {stage} | {ours:.0f} | {theirs:.0f} | {theirs / max(ours, 1e-9):.2f} |")
    for name, (_, total, averages) in results.items():
        print(f"\n### {name}: ops by self CPU time (ms per call, share of forward + postprocess)\n")
        print("| op | self ms | share | calls |\n|---|---|---|---|")
        ops = sorted(
            (e for e in averages if not e.key.startswith("stage:")), key=lambda e: -e.self_cpu_time_total
        )
        for e in ops[: args.top]:
            ms = e.self_cpu_time_total / 1000 / args.iters
            print(f"| `{e.key}` | {ms:.0f} | {100 * ms / total:.1f}% | {e.count // args.iters} |")


if __name__ == "__main__":
    main()
