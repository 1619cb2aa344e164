"""Turn raw predictions into scored, labelled, absolute-coordinate detections."""

from __future__ import annotations

import torch

from ddetr_cli.model.box_ops import box_cxcywh_to_xyxy


@torch.no_grad()
def postprocess(outputs: dict, target_sizes, topk: int = 100) -> list[dict[str, torch.Tensor]]:
    """Top-k (query, class) pairs per image by sigmoid score, boxes in absolute xyxy.

    outputs       {"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4] cxcywh in [0, 1]}
    target_sizes  [B, 2] (height, width) to scale the boxes to (tensor or nested sequence)
    returns       B dicts: "scores" [k] descending, "labels" [k] int64 class indices,
                  "boxes" [k, 4] (x0, y0, x1, y1) in pixels; k = min(topk, Q * C)
    """
    logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
    target_sizes = torch.as_tensor(target_sizes, device=logits.device)
    if target_sizes.shape != (logits.shape[0], 2):
        raise ValueError(
            f"target_sizes must be [{logits.shape[0]}, 2] (h, w), got {list(target_sizes.shape)}"
        )
    scores, labels, boxes = topk_detections(logits, pred_boxes, target_sizes, topk)
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


def topk_detections(
    logits: torch.Tensor, pred_boxes: torch.Tensor, target_sizes: torch.Tensor, topk: int = 100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`postprocess` on whole batches (traceable: the ONNX export runs it inside the graph).

    logits [B, Q, C], pred_boxes [B, Q, 4] cxcywh in [0, 1], target_sizes [B, 2] (h, w)
    returns scores [B, k] descending, labels [B, k] int64 class indices, boxes [B, k, 4] xyxy pixels
    """
    batch, num_queries, num_classes = logits.shape
    k = min(topk, num_queries * num_classes)
    scores, flat_index = torch.topk(logits.sigmoid().view(batch, -1), k, dim=1)
    query_index = flat_index // num_classes
    labels = flat_index % num_classes
    boxes = box_cxcywh_to_xyxy(pred_boxes)
    boxes = torch.gather(boxes, 1, query_index.unsqueeze(-1).expand(-1, -1, 4))
    img_h, img_w = target_sizes.to(boxes.dtype).unbind(1)
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)
    return scores, labels, boxes * scale[:, None, :]
