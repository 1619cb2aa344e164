"""Pictures a run leaves behind: `results.png` (loss and AP curves) and detection visualisations."""

from __future__ import annotations

import colorsys
from pathlib import Path


def plot_results(rows: list[dict], out_png: str | Path) -> Path | None:
    """Loss terms and AP curves per epoch from metrics.csv rows (dicts of numbers or '')."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def series(key):
        # -1 is COCO's "nothing to score", not a value to draw
        points = [(r["epoch"], r[key]) for r in rows if r.get(key) not in (None, "") and float(r[key]) >= 0]
        return [p[0] for p in points], [float(p[1]) for p in points]

    panels = [
        ("train/loss", "total loss"),
        ("train/loss_ce", "classification (focal)"),
        ("train/loss_bbox", "box L1"),
        ("train/loss_giou", "box GIoU"),
        ("val/AP", "AP"),
        ("val/AP50", "AP50"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), tight_layout=True)
    for ax, (key, title) in zip(axes.ravel(), panels):
        xs, ys = series(key)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def class_colour(index: int) -> tuple[int, int, int]:
    """A distinct, stable BGR colour per class index (golden-ratio hue steps)."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def read_image_raw(path: str | Path):
    """The image at `path` as OpenCV BGR HxWx3 uint8 in its stored pixel order, or None when
    OpenCV cannot read it.

    EXIF orientation is ignored, as the loader (and the official code, and the COCO boxes) do:
    `cv2.imread` would rotate an EXIF-tagged photo, and boxes predicted on the raw pixels would
    then land in the wrong place."""
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)


def draw_detections(image_bgr, detections: list[dict]):
    """Boxes with "name score" labels drawn on a copy of `image_bgr` (OpenCV HxWx3 uint8).

    detections: dicts with `bbox` [x, y, w, h] pixels, `score`, `category_name`, `category_id`.
    """
    import cv2

    canvas = image_bgr.copy()
    h, w = canvas.shape[:2]
    thickness = max(1, round(min(h, w) / 300))
    font_scale = max(0.35, min(h, w) / 900)
    for det in sorted(detections, key=lambda d: d["score"]):
        x, y, bw, bh = det["bbox"]
        x0, y0, x1, y1 = round(x), round(y), round(x + bw), round(y + bh)
        colour = class_colour(int(det.get("category_id", 0)))
        cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, thickness, cv2.LINE_AA)
        label = f"{det.get('category_name', det.get('category_id'))} {det['score']:.2f}"
        (tw, th), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y0 - 2 if y0 - th - baseline - 2 >= 0 else min(h - 1, y0 + th + baseline + 2)
        cv2.rectangle(canvas, (x0, ty - th - baseline), (x0 + tw + 2, ty + 1), colour, -1)
        cv2.putText(
            canvas,
            label,
            (x0 + 1, ty - baseline + 1),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
    return canvas
