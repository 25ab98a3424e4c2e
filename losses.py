"""Detection loss: ATSS target assignment, quality focal loss for classes, GIoU loss for boxes.

Why ATSS (Zhang et al. 2020, "Bridging the Gap Between Anchor-based and Anchor-free Detection"):
it picks positives from geometry alone (the k points nearest each box centre per level, kept when their
IoU beats the mean + std of the candidates), so it gives sensible targets from the first iteration of a
randomly initialised or freshly re-headed model. Prediction-dependent assigners (SimOTA, TAL) are stronger
once the model predicts well, but are noisy early and on tiny datasets, which is exactly where our
fine-tuning runs live; NanoDet and GFL trained their small models with ATSS for that reason.

The classification target of a positive is the IoU of its predicted box with its ground truth (GFL's
quality focal loss), so the score ranks boxes by localisation quality, which COCO mAP rewards. With 0/1
targets the loss is exactly torchvision's sigmoid_focal_loss.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss


def quality_focal_loss(logits, targets, gamma=2.0, alpha=None):
    """Focal loss with soft targets in [0, 1] (GFL, Li et al. 2020), unreduced.

    -|y - p|^gamma * (y log p + (1 - y) log(1 - p)); alpha (if given) weights positives by alpha and
    negatives by 1 - alpha. For binary targets it equals torchvision.ops.sigmoid_focal_loss.
    """
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * (targets - prob).abs().pow(gamma)
    if alpha is not None and alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def paired_box_iou(boxes1, boxes2, eps=1e-7):
    """IoU of boxes1[i] with boxes2[i] (torchvision's box_iou is all-pairs). (N, 4) xyxy -> (N,)."""
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area1 + area2 - inter + eps)


class ATSSAssigner:
    """Adaptive training sample selection for points, vectorised over the batch.

    Each point gets a pseudo anchor box of `anchor_scale * stride` (ATSS's FCOS variant). Per ground
    truth and per level, the `topk` points closest to its centre are candidates; candidates whose anchor
    IoU is at least mean + std of the candidates' IoUs and whose point lies inside the box are positive.
    A point claimed by several boxes goes to the one it overlaps most. A box left without positives (tiny
    objects between grid points, or a small box nested in a larger one) gets its best candidate unless that
    point is another box's only positive, so no object is silently ignored.
    """

    def __init__(self, topk=9, anchor_scale=8.0):
        self.topk = topk
        self.anchor_scale = anchor_scale

    @torch.no_grad()
    def __call__(self, points, strides, level_sizes, gt_boxes, gt_mask):
        """
        Args:
            points: (A, 2) xy; strides: (A,); level_sizes: points per level, in order.
            gt_boxes: (B, M, 4) xyxy, padded; gt_mask: (B, M) bool, True for real boxes.
        Returns:
            assigned_gt (B, A) int64 index into M, and foreground (B, A) bool.
        """
        batch_size, num_gt = gt_mask.shape
        half = strides[:, None] * self.anchor_scale / 2
        anchors = torch.cat([points - half, points + half], dim=1)  # (A, 4)
        ious = box_iou(gt_boxes.reshape(-1, 4), anchors).view(batch_size, num_gt, -1)  # (B, M, A)
        centres = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
        distances = (centres[:, :, None, :] - points[None, None]).norm(dim=-1)  # (B, M, A)

        candidates, start = [], 0
        for size in level_sizes:
            k = min(self.topk, size)
            candidates.append(distances[..., start:start + size].topk(k, dim=-1, largest=False).indices + start)
            start += size
        candidates = torch.cat(candidates, dim=-1)  # (B, M, K)
        candidate_ious = ious.gather(-1, candidates)
        threshold = candidate_ious.mean(-1, keepdim=True) + candidate_ious.std(-1, keepdim=True)

        is_candidate = torch.zeros_like(ious, dtype=torch.bool).scatter_(-1, candidates, True)
        offsets = torch.cat([points[None, None] - gt_boxes[..., None, :2],
                             gt_boxes[..., None, 2:] - points[None, None]], dim=-1)  # (B, M, A, 4)
        inside = offsets.amin(dim=-1) > 0
        positive = is_candidate & (ious >= threshold) & inside & gt_mask[..., None]

        overlap = ious.masked_fill(~positive, -1.0)
        assigned_gt = overlap.argmax(dim=1)  # (B, A)
        foreground = positive.any(dim=1)
        # A box left with no point (smaller than the grid spacing, or nested in a larger box that wins every
        # shared point on IoU) takes its best candidate, unless that point is another box's only positive.
        counts = self._points_per_box(assigned_gt, foreground, num_gt)
        orphans = (gt_mask & (counts == 0)).nonzero().tolist()
        if orphans:
            best = candidates.gather(-1, candidate_ious.argmax(-1, keepdim=True)).squeeze(-1)  # (B, M)
            for b, m in orphans:
                point = best[b, m]
                owner = assigned_gt[b, point]
                if foreground[b, point] and counts[b, owner] == 1:
                    continue
                if foreground[b, point]:
                    counts[b, owner] -= 1
                assigned_gt[b, point], foreground[b, point], counts[b, m] = m, True, 1
        return assigned_gt, foreground

    @staticmethod
    def _points_per_box(assigned_gt, foreground, num_gt):
        """(B, M) number of foreground points assigned to each box."""
        counts = torch.zeros(assigned_gt.shape[0], num_gt, dtype=torch.int64, device=assigned_gt.device)
        return counts.scatter_add_(1, assigned_gt, foreground.long())


def pad_targets(targets, device):
    """List of per-image targets -> (B, M, 4) boxes, (B, M) labels, (B, M) mask; M >= 1."""
    num_gt = max([len(t["labels"]) for t in targets] + [1])
    boxes = torch.zeros(len(targets), num_gt, 4, device=device)
    labels = torch.zeros(len(targets), num_gt, dtype=torch.int64, device=device)
    mask = torch.zeros(len(targets), num_gt, dtype=torch.bool, device=device)
    for i, target in enumerate(targets):
        n = len(target["labels"])
        boxes[i, :n] = target["boxes_xyxy"].to(device)
        labels[i, :n] = target["labels"].to(device)
        mask[i, :n] = True
    return boxes, labels, mask


class DetectionLoss(nn.Module):
    """Loss of the LightweightDetector's raw outputs against per-image targets.

    forward(outputs, targets) -> {"loss": weighted total, "loss_cls": QFL, "loss_box": GIoU}, each
    normalised by the number of positives (averaged over the processes under DDP). Computed in float32 whatever the autocast dtype.
    """

    def __init__(self, cls_weight=1.0, box_weight=2.0, focal_gamma=2.0, focal_alpha=None, assigner=None):
        super().__init__()
        self.cls_weight = cls_weight
        self.box_weight = box_weight
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        self.assigner = assigner or ATSSAssigner()

    def forward(self, outputs, targets):
        """
        Args:
            outputs: the model's forward dict (cls_logits (B, A, C), box_ltrb (B, A, 4), points, strides,
                level_sizes).
            targets: list of B dicts with "boxes_xyxy" float (N, 4) in input pixels and "labels" int64 (N,).
        """
        cls_logits = outputs["cls_logits"].float()
        points = outputs["points"].float()
        pred_boxes = torch.cat([points - outputs["box_ltrb"][..., :2].float(),
                                points + outputs["box_ltrb"][..., 2:].float()], dim=-1)  # (B, A, 4)
        gt_boxes, gt_labels, gt_mask = pad_targets(targets, cls_logits.device)
        assigned_gt, foreground = self.assigner(points, outputs["strides"], outputs["level_sizes"],
                                                gt_boxes, gt_mask)
        target_boxes = gt_boxes.gather(1, assigned_gt[..., None].expand(-1, -1, 4))[foreground]  # (P, 4)
        target_labels = gt_labels.gather(1, assigned_gt)[foreground]  # (P,)
        positive_boxes = pred_boxes[foreground]
        num_positive = self._mean_positives(foreground)

        cls_targets = torch.zeros_like(cls_logits)
        quality = paired_box_iou(positive_boxes.detach(), target_boxes).clamp(min=0.0)
        batch_index, point_index = foreground.nonzero(as_tuple=True)
        cls_targets[batch_index, point_index, target_labels] = quality
        loss_cls = quality_focal_loss(cls_logits, cls_targets, self.focal_gamma, self.focal_alpha).sum() / num_positive
        if len(target_boxes):
            loss_box = generalized_box_iou_loss(positive_boxes, target_boxes, reduction="sum") / num_positive
        else:
            loss_box = pred_boxes.sum() * 0.0  # keeps the graph (and DDP) intact for all-negative batches
        total = self.cls_weight * loss_cls + self.box_weight * loss_box
        return {"loss": total, "loss_cls": loss_cls.detach(), "loss_box": loss_box.detach()}

    @staticmethod
    def _mean_positives(foreground):
        """The normaliser: positives in this batch, averaged over the processes under DDP (as MMDetection's
        reduce_mean and Detectron2 do), so that N processes, whose gradients DDP averages, compute the
        gradient of one process on the global batch; at least 1."""
        count = foreground.sum().float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return max(float(count), 1.0)
