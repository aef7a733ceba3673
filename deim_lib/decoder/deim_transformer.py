"""DEIMTransformer: DEIMv2's detection decoder (query selection, denoising, FDR refinement, output dicts)."""

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deim_lib.decoder.decoder_layers import (
    MLP,
    DecoderHeads,
    DecoderOutput,
    TransformerDecoder,
    TransformerDecoderLayer,
)
from deim_lib.decoder.denoising import contrastive_denoising_group

__all__ = ["DEIMTransformer", "generate_anchors"]

# Score-head bias for a prior probability of 0.01, so the many background queries start with a small loss.
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)


def generate_anchors(
    spatial_shapes: Sequence[tuple[int, int]],
    eps: float = 0.01,
    grid_size: float = 0.05,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Anchor boxes at every feature-map cell, in logit space.

    Level l cells get centres ((x+0.5)/w, (y+0.5)/h) and size 0.05·2^l; cells are row-major within a level and levels
    are concatenated fine → coarse.

    Returns:
        anchors float32 [1, A, 4] (logit of cxcywh; +inf where invalid), valid_mask bool [1, A, 1] (all four values
        strictly inside (eps, 1 − eps)).
    """
    per_level = []
    for level, (h, w) in enumerate(spatial_shapes):
        # Built on the target device so training does not copy (and synchronise) from the host every step.
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, device=device, dtype=torch.float32),
            torch.arange(w, device=device, dtype=torch.float32),
            indexing="ij",
        )
        centres = torch.stack([(grid_x + 0.5) / w, (grid_y + 0.5) / h], dim=-1)
        sizes = torch.full_like(centres, grid_size * 2.0**level)
        per_level.append(torch.cat([centres, sizes], dim=-1).reshape(h * w, 4))
    anchors = torch.cat(per_level)[None]
    valid_mask = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
    anchors = torch.log(anchors / (1 - anchors))
    return torch.where(valid_mask, anchors, torch.inf), valid_mask


def _layer_outputs(
    logits: list[Tensor], boxes: list[Tensor], corners: list[Tensor], refs: list[Tensor], teacher: tuple[Tensor, Tensor]
) -> list[dict[str, Tensor]]:
    """One dict per layer; ``teacher`` = (corners, logits) of the final layer, the distillation target."""
    return [
        {
            "pred_logits": lg,
            "pred_boxes": bx,
            "pred_corners": cr,
            "ref_points": rf,
            "teacher_corners": teacher[0],
            "teacher_logits": teacher[1],
        }
        for lg, bx, cr, rf in zip(logits, boxes, corners, refs, strict=True)
    ]


def _split_queries(tensors: list[Tensor], split: list[int]) -> tuple[list[Tensor], list[Tensor]]:
    """Split every B×(T+Q)×… tensor into its denoising part and its matching part."""
    parts = [t.split(split, dim=1) for t in tensors]
    return [p[0] for p in parts], [p[1] for p in parts]


class DEIMTransformer(nn.Module):
    """DEIMv2 decoder with official module names (checkpoints load with ``strict=True``).

    Encoder-side query selection picks the ``num_queries`` anchors with the highest class logit; the decoder layers
    then refine boxes as distributions over ``reg_max + 1`` bins (FDR). In training, contrastive denoising queries
    built from the targets are prepended to the matching queries.
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        feat_channels: Sequence[int],
        feat_strides: Sequence[int],
        num_levels: int,
        num_points: Sequence[int],
        num_layers: int,
        dim_feedforward: int,
        reg_scale: float | int,
        use_gateway: bool,
        share_bbox_head: bool,
        eval_spatial_size: tuple[int, int] | None,
        nhead: int = 8,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        reg_max: int = 32,
        eps: float = 0.01,
        eval_idx: int = -1,
        layer_scale: float = 1,
    ) -> None:
        super().__init__()
        if not len(feat_channels) == len(feat_strides) == num_levels == len(num_points):
            raise ValueError("feat_channels, feat_strides and num_points need one entry per level (num_levels)")
        if layer_scale != 1:
            raise ValueError("only layer_scale 1 is supported (every DEIMv2 config uses it)")
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.feat_strides = list(feat_strides)
        self.eps = eps
        self.reg_max = reg_max
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.eval_spatial_size = eval_spatial_size
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx

        self.up = nn.Parameter(torch.tensor([0.5]), requires_grad=False)
        # The tensor keeps the Python value's dtype: int64 for the integer YAML values of official checkpoints.
        self.reg_scale = nn.Parameter(torch.tensor([reg_scale]), requires_grad=False)
        if eval_spatial_size is not None:
            anchors, valid_mask = generate_anchors(self._eval_shapes(), eps)
            self.register_buffer("anchors", anchors)
            self.register_buffer("valid_mask", valid_mask)
        self.input_proj = nn.ModuleList(self._input_proj(c) for c in feat_channels)
        layer = TransformerDecoderLayer(hidden_dim, nhead, dim_feedforward, num_points, use_gateway)
        self.decoder = TransformerDecoder(layer, num_layers, nhead, reg_max, self.up, self.reg_scale, self.eval_idx)
        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_pos_head = MLP(4, hidden_dim, hidden_dim, 3)
        self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self._build_layer_heads(num_layers, share_bbox_head)
        self._reset_parameters()

    def _eval_shapes(self) -> list[tuple[int, int]]:
        height, width = self.eval_spatial_size
        return [(int(height / s), int(width / s)) for s in self.feat_strides]

    def _input_proj(self, in_channels: int) -> nn.Module:
        if in_channels == self.hidden_dim:
            return nn.Identity()
        conv = nn.Conv2d(in_channels, self.hidden_dim, 1, bias=False)
        nn.init.xavier_uniform_(conv.weight)
        return nn.Sequential(OrderedDict(conv=conv, norm=nn.BatchNorm2d(self.hidden_dim)))

    def _build_layer_heads(self, num_layers: int, share_bbox_head: bool) -> None:
        """One score head and one corner head per layer, deep copies of one initialised instance (or one shared
        corner head, as the small official variants use)."""
        score_head = nn.Linear(self.hidden_dim, self.num_classes)
        nn.init.constant_(score_head.bias, PRIOR_BIAS)
        bbox_head = MLP(self.hidden_dim, self.hidden_dim, 4 * (self.reg_max + 1), 3)
        nn.init.zeros_(bbox_head.layers[-1].weight)
        nn.init.zeros_(bbox_head.layers[-1].bias)
        self.dec_score_head = nn.ModuleList(copy.deepcopy(score_head) for _ in range(num_layers))
        self.dec_bbox_head = nn.ModuleList(
            bbox_head if share_bbox_head else copy.deepcopy(bbox_head) for _ in range(num_layers)
        )

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.enc_score_head.bias, PRIOR_BIAS)
        # Zero last layers: encoder boxes start at their anchors and the first refinement starts at the encoder box.
        for head in (self.enc_bbox_head, self.pre_bbox_head):
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        for linear in self.query_pos_head.layers:
            nn.init.xavier_uniform_(linear.weight)

    def convert_to_deploy(self) -> None:
        """Inference-only layout: score heads before eval_idx (and corner heads after it) become Identity.

        Call after loading weights; the state_dict then no longer matches official training checkpoints.
        """
        for i in range(len(self.dec_score_head)):
            if i < self.eval_idx:
                self.dec_score_head[i] = nn.Identity()
            if i > self.eval_idx:
                self.dec_bbox_head[i] = nn.Identity()
        self.decoder.convert_to_deploy()

    def forward(
        self,
        feats: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        score_bias: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Any]:
        """Decode detections from multi-scale features.

        Args:
            feats: B×C_l×h_l×w_l float maps, fine → coarse (in eval they must have the eval_spatial_size shapes).
            targets: per image ``labels`` int64 [n], ``boxes`` float32 [n, 4] cxcywh normalised; used only in
                training, to build denoising queries.
            score_bias: optional map from decoder query features B×Q'×D (Q' includes denoising queries) to B×Q'×C,
                added to every decoder score-head result (pre-scores included) before the LQE term.

        Returns:
            eval: {pred_logits B×Q×C, pred_boxes B×Q×4 cxcywh normalised} of layer eval_idx. Training: the final
            layer's pred_logits / pred_boxes / pred_corners B×Q×4(R+1) / ref_points B×Q×4, ``up``, ``reg_scale``,
            aux_outputs (one dict per earlier layer, with teacher_corners / teacher_logits), enc_aux_outputs,
            pre_outputs, enc_meta and, with denoising, dn_outputs (every layer), dn_pre_outputs and dn_meta.
        """
        memory, spatial_shapes = self._flatten_features(feats)
        dn = None
        if self.training and self.num_denoising > 0 and targets is not None:
            dn = contrastive_denoising_group(
                targets,
                self.num_classes,
                self.num_queries,
                self.denoising_class_embed,
                self.num_denoising,
                self.label_noise_ratio,
            )
        content, ref_points_unact, enc_output = self._select_queries(memory, spatial_shapes)
        if dn is not None:
            content = torch.cat([dn.content, content], dim=1)
            ref_points_unact = torch.cat([dn.ref_points_unact, ref_points_unact], dim=1)
        heads = DecoderHeads(self.dec_score_head, self.dec_bbox_head, self.query_pos_head, self.pre_bbox_head)
        attn_mask = dn.attn_mask if dn is not None else None
        out = self.decoder(content, ref_points_unact, memory, spatial_shapes, heads, attn_mask, score_bias)
        if not self.training:
            return {"pred_logits": out.logits[-1], "pred_boxes": out.boxes[-1]}
        return self._training_outputs(out, enc_output, dn.dn_meta if dn is not None else None)

    def _flatten_features(self, feats: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Project each level and concatenate them row-major: memory B×Σ×D and the (h, w) of each level."""
        projected = [proj(feat) for proj, feat in zip(self.input_proj, feats, strict=True)]
        spatial_shapes = [(feat.shape[2], feat.shape[3]) for feat in projected]
        memory = torch.cat([feat.flatten(2).transpose(1, 2) for feat in projected], dim=1)
        return memory, spatial_shapes

    def _select_queries(
        self, memory: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor, dict[str, Tensor] | None]:
        """Top-Q positions by max class logit → detached content B×Q×D and logit-space references B×Q×4, plus the
        encoder output {pred_logits, pred_boxes} in training."""
        if self.training or self.eval_spatial_size is None:
            anchors, valid_mask = generate_anchors(spatial_shapes, self.eps, device=memory.device)
        else:
            if memory.shape[1] != self.anchors.shape[1]:
                raise ValueError(f"eval input must have the eval_spatial_size {self.eval_spatial_size} feature shapes")
            anchors, valid_mask = self.anchors, self.valid_mask
        # Border cells are zeroed so they only win the selection by their bias (the anchors there are +inf).
        memory = valid_mask.to(memory.dtype) * memory
        enc_logits = self.enc_score_head(memory)
        topk_index = enc_logits.max(-1).values.topk(self.num_queries, dim=1).indices[..., None]  # B×Q×1
        topk_memory = memory.gather(1, topk_index.expand(-1, -1, memory.shape[-1]))
        topk_anchors = anchors.expand(memory.shape[0], -1, -1).gather(1, topk_index.expand(-1, -1, 4))
        enc_boxes_unact = self.enc_bbox_head(topk_memory) + topk_anchors
        enc_output = None
        if self.training:
            topk_logits = enc_logits.gather(1, topk_index.expand(-1, -1, enc_logits.shape[-1]))
            enc_output = {"pred_logits": topk_logits, "pred_boxes": F.sigmoid(enc_boxes_unact)}
        # The decoder starts from the selection but must not push gradients back into the encoder head through it.
        return topk_memory.detach(), enc_boxes_unact.detach(), enc_output

    def _training_outputs(
        self, out: DecoderOutput, enc_output: dict[str, Tensor] | None, dn_meta: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The official training dict, matching-query parts split from the denoising parts."""
        boxes, logits, corners, refs = out.boxes, out.logits, out.corners, out.refs
        pre_boxes, pre_logits = out.pre_boxes, out.pre_logits
        if dn_meta is not None:
            split = dn_meta["dn_num_split"]
            dn_boxes, boxes = _split_queries(boxes, split)
            dn_logits, logits = _split_queries(logits, split)
            dn_corners, corners = _split_queries(corners, split)
            dn_refs, refs = _split_queries(refs, split)
            (dn_pre_boxes, dn_pre_logits), (pre_boxes, pre_logits) = _split_queries([pre_boxes, pre_logits], split)
        result: dict[str, Any] = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "pred_corners": corners[-1],
            "ref_points": refs[-1],
            "up": self.up,
            "reg_scale": self.reg_scale,
            "aux_outputs": _layer_outputs(logits[:-1], boxes[:-1], corners[:-1], refs[:-1], (corners[-1], logits[-1])),
            "enc_aux_outputs": [enc_output],
            "pre_outputs": {"pred_logits": pre_logits, "pred_boxes": pre_boxes},
            "enc_meta": {"class_agnostic": False},
        }
        if dn_meta is not None:
            result["dn_outputs"] = _layer_outputs(
                dn_logits, dn_boxes, dn_corners, dn_refs, (dn_corners[-1], dn_logits[-1])
            )
            result["dn_pre_outputs"] = {"pred_logits": dn_pre_logits, "pred_boxes": dn_pre_boxes}
            result["dn_meta"] = dn_meta
        return result
