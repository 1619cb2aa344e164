"""ddetr against Hugging Face transformers' `DeformableDetrForObjectDetection` on the same weights and
input (the engine behind `ddetr bench --compare-hf`).

Both sides run forward + post-processing (top-100 detections in pixels): ours through
`ddetr_cli.model.postprocess`, theirs through `DeformableDetrImageProcessor.post_process_object_detection`
(threshold 0, so both keep 100). Calls are interleaved (ours, theirs, ours, ...) so that load on a
shared machine hits both alike; the speed-up is the ratio of the median latencies. Before timing,
both sides' detections are compared, so the timing compares like with like.
"""

from __future__ import annotations

import statistics
import time

from ddetr_cli.benchmarking import latency_summary, synchronize
from ddetr_cli.console import UserError


def require_transformers(backbone_layout: str = "timm") -> None:
    """UserError unless transformers (and timm, for the timm layout) can be imported."""
    for package, needed in (("transformers", True), ("timm", backbone_layout == "timm")):
        if not needed:
            continue
        try:
            __import__(package)
        except ImportError:
            raise UserError(f"--compare-hf needs {package}: pip install transformers timm") from None


def hf_twin(model, backbone_layout: str = "timm"):
    """`model`'s weights in a Hugging Face `DeformableDetrForObjectDetection` (eval mode, same device).

    UserError when transformers (or timm, for the timm layout) is missing or the backbone has no
    Hugging Face equivalent (the tiny demo backbone).
    """
    require_transformers(backbone_layout)
    import transformers

    from ddetr_cli.model.checkpoint import to_hf_config, to_hf_state_dict

    try:
        config = transformers.DeformableDetrConfig(**to_hf_config(model, backbone_layout))
        state = to_hf_state_dict(model, backbone_layout)
    except ValueError as e:
        raise UserError(f"--compare-hf: {e}") from None
    twin = transformers.DeformableDetrForObjectDetection(config)
    twin.load_state_dict(state, strict=True)
    device = next(model.parameters()).device
    return twin.to(device).eval()


class HfDetector:
    """A Hugging Face model + its image processor's post-processing behind ddetr's detector call:
    `detector(images, mask, sizes)` -> B dicts "scores" [k], "labels" [k], "boxes" [k, 4] xyxy."""

    def __init__(self, twin):
        import transformers

        self.model = twin
        self.processor = transformers.DeformableDetrImageProcessor()

    def __call__(self, images, mask, sizes, topk: int = 100) -> list[dict]:
        import torch

        with torch.inference_mode():  # as ours: neither side pays for autograd bookkeeping
            outputs = self.model(pixel_values=images, pixel_mask=(~mask).long())
            return self.processor.post_process_object_detection(
                outputs, threshold=0.0, target_sizes=sizes, top_k=topk
            )


def ddetr_detector(model):
    """Our model + postprocess behind the same call as HfDetector."""
    import torch

    from ddetr_cli.model import postprocess

    def detect(images, mask, sizes, topk: int = 100) -> list[dict]:
        with torch.inference_mode():
            return postprocess(model(images, mask), sizes, topk=topk)

    return detect


def detection_difference(ours: list[dict], theirs: list[dict], score_tol: float = 1e-5) -> dict:
    """How far two detectors' results are apart: the largest difference of the sorted scores, and of
    the boxes (pixels, L-inf) where each of our detections is matched to theirs of the same label and a
    score within `score_tol` (scores equal to float noise may swap ranks); `unmatched` counts ours
    without such a partner (at the top-k cut, a swap can leave one out on either side)."""
    import torch

    score, box, unmatched = 0.0, 0.0, 0
    for a, b in zip(ours, theirs):
        k = min(len(a["scores"]), len(b["scores"]))
        if k == 0:
            continue
        score = max(score, float((a["scores"][:k] - b["scores"][:k]).abs().max()))
        partner = (a["labels"][:, None] == b["labels"][None]) & (
            (a["scores"][:, None] - b["scores"][None]).abs() <= score_tol
        )
        distance = (a["boxes"][:, None] - b["boxes"][None]).abs().amax(-1)
        nearest = distance.masked_fill(~partner, float("inf")).amin(1)
        found = torch.isfinite(nearest)
        unmatched += int((~found).sum())
        if found.any():
            box = max(box, float(nearest[found].max()))
    return {"max_score_diff": score, "max_box_diff_px": box, "unmatched": unmatched}


def interleaved_latencies(runs: dict, device, warmup: int, iters: int) -> dict[str, list[float]]:
    """Each callable in `runs` `warmup` times untimed, then `iters` rounds of one timed call each, in
    turn (the order alternates every round) -> name: latencies in ms."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    latencies: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        for name in names if i % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            latencies[name].append((time.perf_counter() - start) * 1000)
    return latencies


def compare_hf(
    model,
    images,
    mask,
    device,
    warmup: int,
    iters: int,
    backbone_layout: str = "timm",
    unfused: bool = False,
    twin=None,
) -> dict:
    """Time ddetr (fused for inference, as `ddetr bench` runs it) and its Hugging Face twin
    interleaved on `images` / `mask` (fp32) -> report dict: per side images/s and latency, `speedup`
    (HF median / ours), per-round ratios, and how far the two sides' detections are apart.
    `unfused`: time the model as trained / saved too (`ddetr_unfused`, `speedup_unfused`).
    `twin`: hf_twin(model, backbone_layout) when already built."""
    import torch

    from ddetr_cli.model.fused import fuse_for_inference

    twin = HfDetector(twin if twin is not None else hf_twin(model, backbone_layout))
    sides = {"ddetr": ddetr_detector(fuse_for_inference(model))}
    if unfused:
        sides["ddetr_unfused"] = ddetr_detector(model)
    sides["hf"] = twin
    sizes = torch.tensor([images.shape[-2:]] * images.shape[0], device=images.device)
    difference = detection_difference(sides["ddetr"](images, mask, sizes), twin(images, mask, sizes))
    latencies = interleaved_latencies(
        {name: (lambda d=detect: d(images, mask, sizes)) for name, detect in sides.items()},
        device,
        warmup,
        iters,
    )
    report = {
        "transformers": __import__("transformers").__version__,
        "backbone_layout": backbone_layout,
        **{name: latency_summary(times, images.shape[0]) for name, times in latencies.items()},
        "round_speedups": [h / o for o, h in zip(latencies["ddetr"], latencies["hf"])],
        "detections": difference,
    }
    hf_median = statistics.median(latencies["hf"])
    for name in sides.keys() - {"hf"}:
        suffix = name[len("ddetr") :]
        report["speedup" + suffix] = hf_median / statistics.median(latencies[name])
    return report
