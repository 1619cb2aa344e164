"""Where inference time goes: ddetr and Hugging Face's `DeformableDetrForObjectDetection` under
`torch.profiler` (CPU), on the same weights and input, forward + post-processing.

    python benchmarks/profile_hf.py --imgsz 800x1066 --iters 2 [--top 15]

Prints markdown: per side, milliseconds per image by stage (backbone with its position encoding,
input projections, encoder, decoder, heads; "total" = forward + post-processing) and the ops with
the most self time. The two sides' calls alternate inside one profiling session. ddetr runs its
fused inference copy, as `ddetr bench` does. A random R50 plain Deformable DETR (91 classes),
batch 1, fp32, torch's thread setting (2 threads on the 2-core box).
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


def unique(modules: list) -> list:
    """Each module once (the plain model repeats one head per decoder layer)."""
    return list({id(m): m for m in modules}.values())


def ddetr_stages(model) -> dict[str, list]:
    return {
        "backbone": [model.backbone],
        "input_proj": list(model.input_proj),
        "encoder": [model.transformer.encoder],
        "decoder": [model.transformer.decoder],
        "heads": unique([*model.class_embed, *model.bbox_embed]),
    }


def hf_stages(twin) -> dict[str, list]:
    inner = twin.model
    return {
        "backbone": [inner.backbone],  # the conv model and its position encoding, as ours
        "input_proj": list(inner.input_proj),
        "encoder": [inner.encoder],
        "decoder": [inner.decoder],
        "heads": unique([*twin.class_embed, *twin.bbox_embed]),
    }


@contextlib.contextmanager
def labelled(side: str, stages: dict[str, list]):
    """Each stage module's forward inside a profiler range named `<side>:<stage>`."""
    handles, open_ranges = [], []
    for name, modules in stages.items():
        for module in modules:

            def enter(module, args, name=name):
                scope = record_function(f"{side}:{name}")
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


def profile(sides: dict, images, mask, sizes, iters: int) -> dict:
    """Profile the sides' calls interleaved (a, b, a, b, ...: load on the machine hits both alike)
    -> per side: stage -> ms per call (with "total"), and op name -> [self ms per call, calls per call]."""
    for detect, _ in sides.values():
        detect(images, mask, sizes)  # warm-up
    with contextlib.ExitStack() as stack:
        for side, (_, stages) in sides.items():
            stack.enter_context(labelled(side, stages))
        prof = stack.enter_context(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]))
        for _ in range(iters):
            for side, (detect, _) in sides.items():
                with record_function(f"{side}:total"):
                    detect(images, mask, sizes)
    results = {side: ({}, {}) for side in sides}
    for event in prof.events():
        root = event
        while root.cpu_parent is not None:
            root = root.cpu_parent
        side = root.name.split(":")[0]
        if side not in results:
            continue
        stages, ops = results[side]
        if event.name.startswith(f"{side}:") and not event.name.startswith(f"{side}::"):  # not ddetr:: ops
            stage = event.name[len(side) + 1 :]
            stages[stage] = stages.get(stage, 0.0) + event.cpu_time_total / 1000 / iters
        else:
            entry = ops.setdefault(event.name, [0.0, 0])
            entry[0] += event.self_cpu_time_total / 1000 / iters
            entry[1] += 1
    return results


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
    results = profile(sides, images, mask, sizes, args.iters)
    threads = torch.get_num_threads()
    print(f"## {height}x{width}, batch 1, fp32, {threads} threads, {args.iters} profiled calls each\n")
    print("| stage | ddetr ms | hf ms | hf / ddetr |\n|---|---|---|---|")
    for stage in (*STAGES[:-1], "total"):
        ours, theirs = results["ddetr"][0].get(stage, 0.0), results["hf"][0].get(stage, 0.0)
        print(f"| {stage} | {ours:.0f} | {theirs:.0f} | {theirs / max(ours, 1e-9):.2f} |")
    for name, (stages, ops) in results.items():
        total = stages["total"]
        print(f"\n### {name}: ops by self CPU time (ms per call, share of forward + postprocess)\n")
        print("| op | self ms | share | calls |\n|---|---|---|---|")
        for op, (ms, count) in sorted(ops.items(), key=lambda item: -item[1][0])[: args.top]:
            print(f"| `{op}` | {ms:.0f} | {100 * ms / total:.1f}% | {count // args.iters} |")


if __name__ == "__main__":
    main()
