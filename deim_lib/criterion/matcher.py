"""Hungarian matching between decoder queries and ground-truth boxes, as official DEIMv2 does it.

The cost matrix of the whole batch is one computation; each image's own block of the matrices of every output matched
in one call reaches the host in one copy, and only the assignment itself runs per image, on the CPU, with scipy's
``linear_sum_assignment``.
"""

import itertools
from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from deim_lib.box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]  # per image: (query indices, target indices)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising a focal-class + L1 + GIoU cost.

    From ``matcher_change_epoch`` on (when ``change_matcher``), the cost becomes ``-p · IoU^iou_order_alpha`` where
    ``p`` is the predicted probability of the target's class, so queries are ranked by a quality-aware score.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        change_matcher: bool = True,
        iou_order_alpha: float = 4.0,
        matcher_change_epoch: int = 100,
    ) -> None:
        super().__init__()
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma
        self.change_matcher = change_matcher
        self.iou_order_alpha = iou_order_alpha
        self.matcher_change_epoch = matcher_change_epoch

    @torch.no_grad()
    def forward(self, outputs: dict | Sequence[dict], targets: list[dict], epoch: int = 0) -> Indices | list[Indices]:
        """Match every image of the batch, for one output or for a list of outputs at once.

        Args:
            outputs: ``pred_logits`` float [B, Q, C] (class logits) and ``pred_boxes`` float [B, Q, 4] (cxcywh,
                normalised), other keys ignored; or a list of such dicts (e.g. every decoder layer), whose cost
                matrices then reach the host in one device→host copy, so a GPU caller waits for the device once.
            targets: B dicts with ``labels`` int64 [G_b] and ``boxes`` float [G_b, 4] (cxcywh, normalised).
            epoch: 0-based training epoch; selects the cost (see the class docstring).

        Returns:
            B pairs ``(query_indices, target_indices)``, int64 CPU tensors of length min(Q, G_b), ordered by
            ascending query index; for a list of outputs, a list of those, one per output.
        """
        if isinstance(outputs, dict):
            return self._match([outputs], targets, epoch)[0]
        return self._match(outputs, targets, epoch)

    def _match(self, outputs: Sequence[dict], targets: list[dict], epoch: int) -> list[Indices]:
        sizes = [len(t["boxes"]) for t in targets]
        if not outputs or sum(sizes) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return [[(empty, empty.clone()) for _ in sizes] for _ in outputs]

        labels, boxes = torch.cat([t["labels"] for t in targets]), torch.cat([t["boxes"] for t in targets])
        costs = [self._cost_matrix(out, labels, boxes, epoch) for out in outputs]
        # Image b is assigned only on its own block (its queries × its targets): the blocks of every output are
        # gathered on the device and only they travel to the host, B times less than the full-batch matrices.
        queries = [out["pred_logits"].shape[1] for out in outputs]
        starts = itertools.accumulate((cost.numel() for cost in costs[:-1]), initial=0)
        block_index = {q: _own_blocks_index(q, sizes) for q in set(queries)}
        index = torch.cat([start + block_index[q] for start, q in zip(starts, queries, strict=True)])
        own = torch.cat([cost.flatten() for cost in costs])[host_to_device(index, costs[0].device)]
        # NaN costs (e.g. 0/0 IoU of two degenerate boxes) would make scipy fail; official DEIMv2 treats them as 1.
        own = torch.where(own.isnan(), 1.0, own).cpu()
        matchings = []
        for q, per_output in zip(queries, own.split([q * sum(sizes) for q in queries]), strict=True):
            blocks = per_output.split([q * g for g in sizes])
            matchings.append([_assign(block.view(q, g)) for block, g in zip(blocks, sizes, strict=True)])
        return matchings

    def _cost_matrix(self, outputs: dict, target_labels: Tensor, target_boxes: Tensor, epoch: int) -> Tensor:
        """Cost of every (query of the batch, target of the batch) pair: float [B·Q, ΣG_b]."""
        prob = outputs["pred_logits"].flatten(0, 1).sigmoid()
        pred_boxes = outputs["pred_boxes"].flatten(0, 1)
        prob = prob[:, target_labels]

        if self.change_matcher and epoch >= self.matcher_change_epoch:
            # Plain IoU without eps: two empty boxes give NaN, which _match() replaces.
            iou = box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes))
            return -(prob * iou**self.iou_order_alpha)

        neg_cost = (1 - self.alpha) * (prob**self.gamma) * (-(1 - prob + 1e-8).log())
        pos_cost = self.alpha * ((1 - prob) ** self.gamma) * (-(prob + 1e-8).log())
        cost_class = pos_cost - neg_cost
        cost_bbox = torch.cdist(pred_boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou


def _own_blocks_index(num_queries: int, sizes: list[int]) -> Tensor:
    """Positions in a flattened [B·Q, ΣG_b] cost matrix of image b's [Q, G_b] block, row-major, for b = 0 … B−1."""
    per_image = torch.tensor(sizes, dtype=torch.int64)
    block_sizes = num_queries * per_image
    total = num_queries * sum(sizes)
    image = torch.arange(len(sizes)).repeat_interleave(block_sizes, output_size=total)
    within = torch.arange(total) - (block_sizes.cumsum(0) - block_sizes)[image]  # position inside the block
    query, target = within // per_image[image], within % per_image[image]
    first_target = per_image.cumsum(0) - per_image  # image b's first column
    return (image * num_queries + query) * sum(sizes) + first_target[image] + target


def host_to_device(host: Tensor, device: torch.device) -> Tensor:
    """Copy a CPU tensor to ``device`` without blocking the host (from pinned memory on CUDA)."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _assign(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment of a float CPU [Q, G] block: (query, target) int64 indices."""
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
