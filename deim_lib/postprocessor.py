"""DEIMv2 post-processing: sigmoid scores, top-k over queries × classes, boxes in pixels of the original image."""

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

# COCO category id of each contiguous label 0..79 (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused by COCO).
COCO_CATEGORY_IDS = [
    *range(1, 12),
    *range(13, 26),
    27,
    28,
    *range(31, 45),
    *range(46, 66),
    67,
    70,
    *range(72, 83),
    *range(84, 91),
]


class PostProcessor(nn.Module):
    """Turns eval outputs into detections, as the official DEIMv2 post-processor does.

    ``forward(outputs, orig_target_sizes)``: ``outputs`` = {"pred_logits": B×Q×C, "pred_boxes": B×Q×4 normalised
    cxcywh}; ``orig_target_sizes`` B×2 as **(width, height)**. Returns per image a dict with ``labels`` int64 [k],
    ``boxes`` float32 [k, 4] xyxy in pixels of the original image and ``scores`` [k], k = ``num_top_queries``, sorted by
    score. The top-k runs over the flattened Q×C sigmoid scores, so a query may appear with several labels. No score
    threshold, no NMS. After ``deploy()`` it returns the tuple (labels, boxes, scores) of batched tensors, unmapped.
    """

    def __init__(self, num_classes: int, num_top_queries: int = 300, remap_mscoco_category: bool = False):
        super().__init__()
        if remap_mscoco_category and num_classes != len(COCO_CATEGORY_IDS):
            raise ValueError(f"remap_mscoco_category needs 80 classes, got {num_classes}")
        self.num_classes = num_classes
        self.num_top_queries = num_top_queries
        self.remap_mscoco_category = remap_mscoco_category
        self.deploy_mode = False

    def forward(self, outputs: dict[str, Tensor], orig_target_sizes: Tensor):
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        boxes = box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy") * orig_target_sizes.repeat(1, 2).unsqueeze(1)

        scores = logits.sigmoid().flatten(1)
        scores, index = torch.topk(scores, min(self.num_top_queries, scores.shape[1]), dim=-1)
        labels = index % self.num_classes
        query = index // self.num_classes
        boxes = boxes.gather(dim=1, index=query.unsqueeze(-1).expand(-1, -1, boxes.shape[-1]))

        if self.deploy_mode:
            return labels, boxes, scores
        if self.remap_mscoco_category:
            labels = torch.tensor(COCO_CATEGORY_IDS, device=boxes.device)[labels]
        return [
            {"labels": lab, "boxes": box, "scores": sco} for lab, box, sco in zip(labels, boxes, scores, strict=True)
        ]

    def deploy(self) -> "PostProcessor":
        self.eval()
        self.deploy_mode = True
        return self
