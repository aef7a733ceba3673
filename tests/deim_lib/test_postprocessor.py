"""PostProcessor: top-k over queries × classes, (width, height) scaling, COCO category remapping, deploy tuple."""

import torch

from deim_lib import PostProcessor
from deim_lib.postprocessor import COCO_CATEGORY_IDS


def test_topk_runs_over_queries_and_classes_and_scales_by_width_height():
    logits = torch.full((1, 2, 3), -10.0)
    logits[0, 0, 2], logits[0, 1, 0], logits[0, 1, 1] = 3.0, 2.0, 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5]]])  # cxcywh
    (result,) = PostProcessor(num_classes=3, num_top_queries=3)(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 100]])
    )
    assert result["labels"].tolist() == [2, 0, 1]  # query 1 appears twice, with two labels
    torch.testing.assert_close(result["scores"], torch.tensor([3.0, 2.0, 1.0]).sigmoid())
    torch.testing.assert_close(result["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))  # x by 200, y by 100
    torch.testing.assert_close(result["boxes"][1], torch.tensor([0.0, 0.0, 100.0, 50.0]))


def test_coco_remap_and_deploy_tuple():
    assert len(COCO_CATEGORY_IDS) == 80 and len(set(COCO_CATEGORY_IDS)) == 80
    assert (COCO_CATEGORY_IDS[0], COCO_CATEGORY_IDS[11], COCO_CATEGORY_IDS[79]) == (1, 13, 90)
    logits = torch.full((1, 1, 80), -10.0)
    logits[0, 0, 11] = 5.0
    outputs = {"pred_logits": logits, "pred_boxes": torch.full((1, 1, 4), 0.5)}
    sizes = torch.tensor([[10, 10]])
    remapped = PostProcessor(80, num_top_queries=1, remap_mscoco_category=True)(outputs, sizes)
    assert remapped[0]["labels"].tolist() == [13]  # label 11 is "stop sign", COCO id 13
    labels, boxes, scores = PostProcessor(80, num_top_queries=1, remap_mscoco_category=True).deploy()(outputs, sizes)
    assert labels.tolist() == [[11]] and boxes.shape == (1, 1, 4) and scores.shape == (1, 1)
