"""Building blocks of DEIMv2's decoder: norms, gates, FFNs, heads, one decoder layer and the refinement loop."""

import copy
import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deim_lib.box_ops import inverse_sigmoid
from deim_lib.decoder.deformable_attention import MSDeformableAttention, split_value
from deim_lib.decoder.fdr import deploy_weighting_function, distance2bbox, integral, weighting_function

__all__ = [
    "LQE",
    "MLP",
    "DecoderHeads",
    "DecoderOutput",
    "Gate",
    "RMSNorm",
    "SwiGLUFFN",
    "TransformerDecoder",
    "TransformerDecoderLayer",
]


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim (eps 1e-6, learned ``scale``).

    Normalises in float32 and casts back before scaling, so an fp16/bf16 input times the fp32 ``scale`` comes out
    promoted to fp32, as official DEIMv2 does.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.scale


class Gate(nn.Module):
    """Gated residual: ``RMSNorm(g1·x1 + g2·x2)`` with ``(g1, g2) = sigmoid(Linear([x1, x2]))``; starts at g = 0.5."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * dim, 2 * dim)
        self.norm = RMSNorm(dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)  # logit(0.5)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        gate1, gate2 = torch.sigmoid(self.gate(torch.cat([x1, x2], dim=-1))).chunk(2, dim=-1)
        return self.norm(gate1 * x1 + gate2 * x2)


class SwiGLUFFN(nn.Module):
    """``w3(silu(u) · v)`` with ``(u, v)`` the two halves of ``w12(x)``; ``hidden_dim`` is the width of u and v."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)
        for linear in (self.w12, self.w3):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class MLP(nn.Module):
    """``num_layers`` Linear layers with in-place SiLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(dims))
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


class LQE(nn.Module):
    """Localization quality estimate: adds a per-query score from the sharpness of the four edge distributions.

    Features per edge are the top-``k`` bin probabilities and their mean (4·(k+1) = 20 values, edge-major).
    """

    def __init__(self, k: int, hidden_dim: int, num_layers: int, reg_max: int) -> None:
        super().__init__()
        self.k = k
        self.reg_max = reg_max
        self.reg_conf = MLP(4 * (k + 1), hidden_dim, 1, num_layers)
        # Starts as a no-op so the class logits alone drive early training.
        nn.init.zeros_(self.reg_conf.layers[-1].weight)
        nn.init.zeros_(self.reg_conf.layers[-1].bias)

    def forward(self, scores: Tensor, pred_corners: Tensor) -> Tensor:
        """scores: B×Q×C logits; pred_corners: B×Q×4(R+1) logits → B×Q×C logits."""
        B, Q, _ = pred_corners.shape
        prob = F.softmax(pred_corners.reshape(B, Q, 4, self.reg_max + 1), dim=-1)
        top = prob.topk(self.k, dim=-1).values
        stat = torch.cat([top, top.mean(dim=-1, keepdim=True)], dim=-1)
        return scores + self.reg_conf(stat.reshape(B, Q, -1))


class TransformerDecoderLayer(nn.Module):
    """Self-attention → deformable cross-attention (gated or norm residual) → SwiGLU FFN, all post-norm RMSNorm."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, num_points: Sequence[int], use_gateway: bool
    ) -> None:
        super().__init__()
        self.use_gateway = use_gateway
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0, batch_first=True)
        self.norm1 = RMSNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, nhead, num_points)
        if use_gateway:
            self.gateway = Gate(d_model)
        else:
            self.norm2 = RMSNorm(d_model)
        self.swish_ffn = SwiGLUFFN(d_model, dim_feedforward // 2)
        self.norm3 = RMSNorm(d_model)

    def forward(
        self,
        target: Tensor,
        reference_points: Tensor,
        value: list[Tensor],
        spatial_shapes: Sequence[tuple[int, int]],
        attn_mask: Tensor | None,
        query_pos: Tensor,
    ) -> Tensor:
        """target, query_pos: B×Q'×D; reference_points: B×Q'×1×4 cxcywh; attn_mask: Q'×Q' bool, True = blocked."""
        q = k = target + query_pos
        attended, _ = self.self_attn(q, k, target, attn_mask=attn_mask, need_weights=False)
        target = self.norm1(target + attended)
        sampled = self.cross_attn(target + query_pos, reference_points, value, spatial_shapes)
        target = self.gateway(target, sampled) if self.use_gateway else self.norm2(target + sampled)
        # The clamp keeps the residual finite when it runs in fp16.
        return self.norm3((target + self.swish_ffn(target)).clamp(min=-65504, max=65504))


class DecoderOutput(NamedTuple):
    """Per-layer results of :class:`TransformerDecoder` (lists hold one entry per recorded layer).

    boxes: B×Q'×4 cxcywh; logits: B×Q'×C (with LQE); corners: B×Q'×4(R+1); refs: B×Q'×4 cxcywh (the box every
    layer decodes around); pre_boxes: B×Q'×4 cxcywh; pre_logits: B×Q'×C without LQE, or None outside training.
    """

    boxes: list[Tensor]
    logits: list[Tensor]
    corners: list[Tensor]
    refs: list[Tensor]
    pre_boxes: Tensor
    pre_logits: Tensor | None


class DecoderHeads(NamedTuple):
    """Heads owned by DEIMTransformer that the refinement loop applies (one score/bbox head per layer)."""

    score: nn.ModuleList
    bbox: nn.ModuleList
    query_pos: nn.Module
    pre_bbox: nn.Module


class TransformerDecoder(nn.Module):
    """Fine-grained distribution refinement over the decoder layers.

    ``up`` and ``reg_scale`` are the very Parameters of the owning DEIMTransformer (aliased, as in official
    checkpoints). Layers, LQE heads are deep copies of one initialised instance.
    """

    def __init__(
        self,
        decoder_layer: TransformerDecoderLayer,
        num_layers: int,
        nhead: int,
        reg_max: int,
        up: nn.Parameter,
        reg_scale: nn.Parameter,
        eval_idx: int,
    ) -> None:
        super().__init__()
        self.up = up
        self.reg_scale = reg_scale
        self.nhead = nhead
        self.reg_max = reg_max
        self.eval_idx = eval_idx
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        lqe = LQE(4, 64, 2, reg_max)
        self.lqe_layers = nn.ModuleList(copy.deepcopy(lqe) for _ in range(num_layers))
        # Deploy mode replaces the differentiable W by a constant; not part of the state_dict.
        self.register_buffer("project", None, persistent=False)

    def convert_to_deploy(self) -> None:
        """Freeze W (computed in Python floats), drop layers after eval_idx and the LQE heads before it."""
        self.project = deploy_weighting_function(self.reg_max, self.up.item(), self.reg_scale.item(), self.up.dtype).to(
            self.up.device
        )
        self.layers = self.layers[: self.eval_idx + 1]
        self.lqe_layers = nn.ModuleList(
            [*(nn.Identity() for _ in range(self.eval_idx)), self.lqe_layers[self.eval_idx]]
        )

    def forward(
        self,
        target: Tensor,
        ref_points_unact: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        heads: DecoderHeads,
        attn_mask: Tensor | None = None,
        score_bias: Callable[[Tensor], Tensor] | None = None,
    ) -> DecoderOutput:
        """Run every layer (in eval, up to eval_idx) and decode its boxes.

        Args:
            target: B×Q'×D initial content queries.
            ref_points_unact: B×Q'×4 logit-space cxcywh references.
            memory: B×Σ×D flattened features; spatial_shapes: (h_l, w_l) per level.
            heads: the per-layer score/corner heads and the query-position and first-layer box heads.
            attn_mask: Q'×Q' bool self-attention mask (True = blocked) when denoising queries are present.
            score_bias: optional map B×Q'×D → B×Q'×C added to every score-head result before LQE.
        """
        value = split_value(memory, spatial_shapes, self.nhead)
        project = (
            self.project if self.project is not None else weighting_function(self.reg_max, self.up, self.reg_scale)
        )
        ref_points = F.sigmoid(ref_points_unact)
        query_pos = heads.query_pos(ref_points).clamp(min=-10, max=10)
        output = target
        output_detach: Tensor | float = 0.0
        corners_prev: Tensor | float = 0.0
        boxes_list, logits_list, corners_list, refs_list = [], [], [], []
        for i, layer in enumerate(self.layers):
            output = layer(output, ref_points.unsqueeze(2), value, spatial_shapes, attn_mask, query_pos)
            record = self.training or i == self.eval_idx
            scores = None
            if record:
                scores = heads.score[i](output)
                if score_bias is not None:
                    scores = scores + score_bias(output)
            if i == 0:
                pre_boxes = F.sigmoid(heads.pre_bbox(output) + inverse_sigmoid(ref_points))
                pre_logits = scores if self.training else None
                # Every layer decodes its distances around this first-layer box.
                ref0 = pre_boxes.detach()
            # Corners accumulate without detach so later layers refine earlier ones through the residual chain.
            corners = heads.bbox[i](output + output_detach) + corners_prev
            boxes = distance2bbox(ref0, integral(corners, project), self.reg_scale)
            if record:
                boxes_list.append(boxes)
                logits_list.append(self.lqe_layers[i](scores, corners))
                corners_list.append(corners)
                refs_list.append(ref0)
                if not self.training:
                    break
            corners_prev = corners
            ref_points = boxes.detach()
            output_detach = output.detach()
        return DecoderOutput(boxes_list, logits_list, corners_list, refs_list, pre_boxes, pre_logits)
