"""Hungarian matching of predictions to ground-truth boxes (one prediction per target)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ddetr_cli.model.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment under cost = c_class * focal + c_bbox * L1 - c_giou * GIoU.

    The class term is the focal-loss difference between calling a prediction the target's class
    and calling it background, evaluated on sigmoid probabilities (alpha 0.25, gamma 2).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma

    @torch.no_grad()
    def cost_matrix(self, outputs: dict, targets: list[dict]) -> torch.Tensor:
        """Costs of every prediction against every target of the batch: [B, Q, sum_i N_i]."""
        batch, num_queries = outputs["pred_logits"].shape[:2]
        prob = outputs["pred_logits"].flatten(0, 1).sigmoid()  # [B*Q, C]
        pred_boxes = outputs["pred_boxes"].flatten(0, 1)  # [B*Q, 4]
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(prob.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(pred_boxes)
        if tgt_labels.numel() and not 0 <= int(tgt_labels.min()) <= int(tgt_labels.max()) < prob.shape[1]:
            raise ValueError(
                f"target labels must be class indices in [0, {prob.shape[1] - 1}], "
                f"got values in [{int(tgt_labels.min())}, {int(tgt_labels.max())}]"
            )

        prob = prob[:, tgt_labels]
        neg_cost = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        pos_cost = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        cost_class = pos_cost - neg_cost
        cost_bbox = torch.cdist(pred_boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return cost.view(batch, num_queries, -1)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """
        outputs  {"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4] cxcywh}
        targets  B dicts with "labels" [N_i] int64 and "boxes" [N_i, 4] cxcywh
        returns  per image (prediction indices, target indices), int64 tensors of length min(Q, N_i)
        """
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(
        self, layers: list[dict], targets: list[dict]
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Match several sets of predictions of the same shape (e.g. every decoder layer's) at once.

        The costs of all layers are computed as one batch and copied to the CPU once (one device
        sync instead of one per layer); the assignment problems are then solved one by one.
        Returns, per layer, what `forward` returns.
        """
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [[(empty, empty) for _ in targets] for _ in layers]
        stacked = {key: torch.cat([out[key] for out in layers]) for key in ("pred_logits", "pred_boxes")}
        cost = self.cost_matrix(stacked, targets).float().cpu()  # [num_layers * B, Q, sum N_i]
        per_image = cost.view(len(layers), len(targets), cost.shape[1], -1).split(sizes, -1)
        return [
            [_assign(per_image[i][layer, i]) for i in range(len(targets))] for layer in range(len(layers))
        ]


def _assign(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal assignment for one image's [Q, N] cost matrix -> (query indices, target indices)."""
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
