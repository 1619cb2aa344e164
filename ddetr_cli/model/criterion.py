"""Set-prediction loss: Hungarian matching, then focal classification loss and L1 + GIoU box losses.

The same losses are applied to every decoder layer (auxiliary losses, suffix `_0`.. `_{n-2}`) and,
in two-stage mode, to the encoder proposals with every target relabelled to class 0 (suffix `_enc`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ddetr_cli.model.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from ddetr_cli.model.config import DeformableDetrConfig
from ddetr_cli.model.matcher import HungarianMatcher


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) summed over all elements and divided by num_boxes.

    logits, targets [B, Q, C] (targets one-hot floats). The official code computes
    `loss.mean(1).sum() / num_boxes * Q`, which is this sum.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() / num_boxes


class SetCriterion(nn.Module):
    """`criterion(outputs, targets)` -> dict of unweighted losses plus "loss", the weighted total.

    outputs: the model's dict; targets: B dicts with "labels" [N_i] int64 and "boxes" [N_i, 4]
    cxcywh normalised. Also returns "class_error" (percent of matched final-layer predictions whose
    top class is wrong; logging only, not in "loss").
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict,
        focal_alpha: float = 0.25,
        aux_loss: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict  # base names: loss_ce, loss_bbox, loss_giou
        self.focal_alpha = focal_alpha
        # The official weight dict only lists the encoder terms when aux losses are on: without them
        # the encoder loss is reported but not trained on. Kept for faithfulness.
        self.weight_enc_loss = aux_loss

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        num_boxes = self._num_boxes(targets, outputs["pred_logits"].device)
        losses = {}

        # Final layer first, then the auxiliary (earlier) decoder layers; matched in one batch.
        final = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
        layers = [final, *outputs.get("aux_outputs", [])]
        layer_indices = self.matcher.match_layers(layers, targets)
        losses.update(self._losses(final, targets, layer_indices[0], num_boxes))
        losses["class_error"] = self._class_error(final, targets, layer_indices[0])
        for i, (aux, indices) in enumerate(zip(layers[1:], layer_indices[1:])):
            aux_losses = self._losses(aux, targets, indices, num_boxes)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})

        if "enc_outputs" in outputs:
            enc = outputs["enc_outputs"]
            binary_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc_losses = self._losses(enc, binary_targets, self.matcher(enc, binary_targets), num_boxes)
            losses.update({f"{k}_enc": v for k, v in enc_losses.items()})

        losses["loss"] = sum(
            self.weight_dict[_base_name(k)] * v for k, v in losses.items() if self._weighted(k)
        )
        return losses

    def _weighted(self, key: str) -> bool:
        return key != "class_error" and (self.weight_enc_loss or not key.endswith("_enc"))

    def _losses(
        self, outputs: dict, targets: list[dict], indices, num_boxes: float
    ) -> dict[str, torch.Tensor]:
        """loss_ce, loss_bbox, loss_giou of one set of predictions given its matching."""
        logits = outputs["pred_logits"]
        batch_idx, src_idx = _prediction_index(indices, logits.device)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, src_idx, matched_labels] = 1.0
        loss_ce = sigmoid_focal_loss(logits, onehot, num_boxes, alpha=self.focal_alpha, gamma=2.0)

        src_boxes = outputs["pred_boxes"][batch_idx, src_idx]
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    @torch.no_grad()
    def _class_error(self, outputs: dict, targets: list[dict], indices) -> torch.Tensor:
        logits = outputs["pred_logits"]
        batch_idx, src_idx = _prediction_index(indices, logits.device)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        if matched_labels.numel() == 0:
            return torch.tensor(100.0, device=logits.device)  # as the official `accuracy` of nothing
        correct = (logits[batch_idx, src_idx].argmax(-1) == matched_labels).float().mean()
        return 100.0 * (1.0 - correct)

    @staticmethod
    def _num_boxes(targets: list[dict], device: torch.device) -> float:
        """Targets per rank, averaged over ranks when distributed, at least 1 (the loss normaliser)."""
        num_boxes = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            num_boxes = num_boxes / dist.get_world_size()
        return max(num_boxes.item(), 1.0)


def _prediction_index(indices, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Matching -> (batch index, query index) of every matched prediction, for advanced indexing."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
    src_idx = torch.cat([src for src, _ in indices]).to(device)
    return batch_idx, src_idx


def _base_name(key: str) -> str:
    """'loss_ce_3' / 'loss_giou_enc' -> 'loss_ce' / 'loss_giou'."""
    return "_".join(key.split("_")[:2])


def build_criterion(config: DeformableDetrConfig) -> SetCriterion:
    """The loss for `config`: matching costs 2/5/2 and loss weights 2/5/2 by default."""
    matcher = HungarianMatcher(config.set_cost_class, config.set_cost_bbox, config.set_cost_giou)
    weight_dict = {
        "loss_ce": config.cls_loss_coef,
        "loss_bbox": config.bbox_loss_coef,
        "loss_giou": config.giou_loss_coef,
    }
    return SetCriterion(
        config.num_classes, matcher, weight_dict, focal_alpha=config.focal_alpha, aux_loss=config.aux_loss
    )
