"""DEIMv2 training losses: MAL classification, L1/GIoU boxes, FGL edge distributions and DDF self-distillation.

Every decoder output (final layer, auxiliary layers, the first-layer "pre" head, the encoder query selection and the
denoising groups) is matched and scored with the same loss functions; the orchestration below decides which indices
and which normaliser each output uses, in the order official DEIMv2 uses (the order matters: the FGL targets and the
DDF positive/negative scales are computed once per call by the first output that needs them and then reused).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from deim_lib.box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from deim_lib.criterion.matcher import HungarianMatcher
from deim_lib.decoder.fdr import bbox2distance
from deim_lib.variants import get_variant

Indices = list[tuple[Tensor, Tensor]]

_LOSS_KEYS = {"mal": ("loss_mal",), "boxes": ("loss_bbox", "loss_giou"), "local": ("loss_fgl", "loss_ddf")}
_DDF_TEMPERATURE = 5.0


@dataclass
class _CallState:
    """Values shared between the outputs of one criterion call."""

    up: Tensor | None
    reg_scale: Tensor | None
    fgl_targets: tuple[Tensor, Tensor, Tensor] | None = None
    fgl_targets_dn: tuple[Tensor, Tensor, Tensor] | None = None
    ddf_scales: tuple[Tensor, Tensor] | None = None


@dataclass
class _Matched:
    """Matched (image, query) positions of one output and their ground truth, flattened over the batch."""

    batch_idx: Tensor  # int64 [N]
    query_idx: Tensor  # int64 [N]
    labels: Tensor  # int64 [N]
    boxes: Tensor  # float [N, 4] cxcywh


class DEIMCriterion(nn.Module):
    """Weighted DEIMv2 losses over all decoder outputs.

    Args:
        matcher: Hungarian matcher used for every non-denoising output.
        weight_dict: weight per loss name (``loss_mal``, ``loss_bbox``, ``loss_giou``, ``loss_fgl``, ``loss_ddf``);
            terms whose name is missing are dropped.
        losses: subset of ``("mal", "boxes", "local")``; "local" yields FGL and DDF for outputs with corners.
        num_classes: C.
        gamma: exponent of the MAL target (IoU^gamma) and of its negative weight.
        reg_max: R, number of distribution bins minus one.
        use_uni_set: use the union ("go") matching for boxes/FGL of decoder outputs and boxes of the encoder output.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        losses: Sequence[str],
        num_classes: int,
        gamma: float = 1.5,
        reg_max: int = 32,
        use_uni_set: bool = True,
    ) -> None:
        super().__init__()
        unknown = set(losses) - set(_LOSS_KEYS)
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; valid: {sorted(_LOSS_KEYS)}")
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = tuple(losses)
        self.num_classes = num_classes
        self.gamma = gamma
        self.reg_max = reg_max
        self.use_uni_set = use_uni_set

    def forward(self, outputs: dict, targets: list[dict], epoch: int = 0) -> dict[str, Tensor]:
        """Compute every weighted loss term.

        Args:
            outputs: the detector's training outputs: ``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4] (cxcywh),
                ``pred_corners`` [B, Q, 4(R+1)], ``ref_points`` [B, Q, 4], ``up``, ``reg_scale``, ``aux_outputs``
                (list of dicts, also carrying ``teacher_corners``/``teacher_logits``), ``pre_outputs``,
                ``enc_aux_outputs`` and, with denoising, ``dn_outputs``, ``dn_pre_outputs``, ``dn_meta``.
            targets: B dicts with ``labels`` int64 [G_b] and ``boxes`` float [G_b, 4] (cxcywh, normalised).
            epoch: 0-based epoch, forwarded to the matcher.

        Returns:
            Scalar tensors keyed ``loss_<name><suffix>`` with suffixes "", ``_aux_i``, ``_pre``, ``_enc_i``,
            ``_dn_i``, ``_dn_pre``; each already multiplied by its weight, NaN replaced by 0. The training objective
            is their plain sum.
        """
        device = outputs["pred_logits"].device
        aux_outputs = list(outputs.get("aux_outputs", []))
        pre_outputs = [outputs["pre_outputs"]] if "pre_outputs" in outputs else []
        enc_outputs = list(outputs.get("enc_aux_outputs", []))

        indices = self.matcher(outputs, targets, epoch)
        layer_indices = [self.matcher(out, targets, epoch) for out in aux_outputs + pre_outputs]
        enc_indices = [self.matcher(out, targets, epoch) for out in enc_outputs]
        go_indices = _union_indices([indices, *layer_indices, *enc_indices])
        num_boxes_go = _mean_over_ranks(sum(len(q) for q, _ in go_indices), device)
        num_boxes = _mean_over_ranks(sum(len(t["labels"]) for t in targets), device)

        state = _CallState(up=outputs.get("up"), reg_scale=outputs.get("reg_scale"))
        go = (go_indices, num_boxes_go)
        decoder_go = {"boxes", "local"} if self.use_uni_set else set()
        enc_go = {"boxes"} if self.use_uni_set else set()
        losses = self._output_losses(outputs, targets, (indices, num_boxes), go, decoder_go, state, "")
        for i, out in enumerate(aux_outputs):
            own = (layer_indices[i], num_boxes)
            losses |= self._output_losses(out, targets, own, go, decoder_go, state, f"_aux_{i}")
        if pre_outputs:
            own = (layer_indices[-1], num_boxes)
            losses |= self._output_losses(pre_outputs[0], targets, own, go, decoder_go, state, "_pre")
        for i, out in enumerate(enc_outputs):
            losses |= self._output_losses(out, targets, (enc_indices[i], num_boxes), go, enc_go, state, f"_enc_{i}")

        if "dn_outputs" in outputs:
            dn_meta = outputs["dn_meta"]
            dn = (_denoising_indices(dn_meta, targets), num_boxes * dn_meta["dn_num_group"])
            dn_outputs = [(out, f"_dn_{i}") for i, out in enumerate(outputs["dn_outputs"])]
            if "dn_pre_outputs" in outputs:
                dn_outputs.append((outputs["dn_pre_outputs"], "_dn_pre"))
            for out, suffix in dn_outputs:
                losses |= self._output_losses(out, targets, dn, dn, set(), state, suffix, is_dn=True)
        # A NaN term (e.g. an empty side of a mean) must not poison the sum; inf is kept so divergence stays visible.
        return {k: torch.where(v.isnan(), torch.zeros_like(v), v) for k, v in losses.items()}

    def _output_losses(
        self,
        output: dict,
        targets: list[dict],
        own: tuple[Indices, float],
        go: tuple[Indices, float],
        go_losses: set[str],
        state: _CallState,
        suffix: str,
        is_dn: bool = False,
    ) -> dict[str, Tensor]:
        """Weighted losses of one output; ``go_losses`` names the losses that use the union matching ``go``."""
        terms: dict[str, Tensor] = {}
        for loss in self.losses:
            if loss == "local" and "pred_corners" not in output:
                continue  # the pre and encoder heads predict plain boxes, without edge distributions
            indices, num_boxes = go if loss in go_losses else own
            matched = _gather_matched(targets, indices, output["pred_logits"].device)
            if loss == "mal":
                terms |= self._loss_mal(output, matched, num_boxes)
            elif loss == "boxes":
                terms |= _loss_boxes(output, matched, num_boxes)
            else:
                terms |= self._loss_local(output, matched, num_boxes, state, is_dn)
        return {k + suffix: v * self.weight_dict[k] for k, v in terms.items() if k in self.weight_dict}

    def _loss_mal(self, output: dict, matched: _Matched, num_boxes: float) -> dict[str, Tensor]:
        """Matchability-aware loss: BCE towards IoU^gamma at matched classes, negatives weighted by p^gamma."""
        logits = output["pred_logits"]  # [B, Q, C]
        pos = (matched.batch_idx, matched.query_idx)
        iou = _paired_iou(output["pred_boxes"][pos].detach(), matched.boxes)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[pos] = matched.labels
        # The extra "no object" column absorbs unmatched queries and is dropped.
        one_hot = F.one_hot(classes, self.num_classes + 1)[..., :-1]
        quality = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        quality[pos] = iou.to(logits.dtype)
        target = (quality.unsqueeze(-1) * one_hot).pow(self.gamma)
        weight = logits.sigmoid().detach().pow(self.gamma) * (1 - one_hot) + one_hot
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
        return {"loss_mal": loss.sum() / num_boxes}

    def _loss_local(
        self, output: dict, matched: _Matched, num_boxes: float, state: _CallState, is_dn: bool
    ) -> dict[str, Tensor]:
        """FGL on the matched edge distributions, plus DDF towards the teacher (final layer) where present."""
        bins = self.reg_max + 1
        pos = (matched.batch_idx, matched.query_idx)
        cached = state.fgl_targets_dn if is_dn else state.fgl_targets
        if cached is None:
            # Every layer decodes around the same first-layer reference and (with the union set) the same
            # indices, so the targets of the first output that gets here serve all of them.
            ref = output["ref_points"][pos].detach()
            cached = bbox2distance(ref, box_cxcywh_to_xyxy(matched.boxes), self.reg_max, state.reg_scale, state.up)
            if is_dn:
                state.fgl_targets_dn = cached
            else:
                state.fgl_targets = cached
        target_bins, weight_right, weight_left = cached

        iou = _paired_iou(output["pred_boxes"][pos], matched.boxes).detach()
        pred_corners = output["pred_corners"][pos].reshape(-1, bins)  # [N·4, R+1], edge-major per box
        left_bin = target_bins.long()
        fgl = (
            F.cross_entropy(pred_corners, left_bin, reduction="none") * weight_left
            + F.cross_entropy(pred_corners, left_bin + 1, reduction="none") * weight_right
        ) * iou.repeat_interleave(4)
        terms = {"loss_fgl": fgl.sum() / num_boxes}
        if "teacher_corners" in output:
            ddf = self._loss_ddf(output, pos, iou, state, is_dn)
            if ddf is not None:
                terms["loss_ddf"] = ddf
        return terms

    def _loss_ddf(
        self, output: dict, pos: tuple[Tensor, Tensor], iou: Tensor, state: _CallState, is_dn: bool
    ) -> Tensor | None:
        """Decoupled distillation: KL from the teacher's edge distributions, matched and unmatched edges balanced.

        Returns None when the output is its own teacher (its corners equal the teacher's exactly).
        """
        bins = self.reg_max + 1
        pred = output["pred_corners"].reshape(-1, bins)  # [B·Q·4, R+1]
        teacher = output["teacher_corners"].reshape(-1, bins).detach()
        if torch.equal(pred, teacher):
            return None
        weight = output["teacher_logits"].detach().sigmoid().amax(dim=-1)  # [B, Q]
        weight[pos] = iou.to(weight.dtype)
        mask = torch.zeros_like(weight, dtype=torch.bool)
        mask[pos] = True
        weight, mask = weight.flatten().repeat_interleave(4), mask.flatten().repeat_interleave(4)
        T = _DDF_TEMPERATURE
        kl = F.kl_div(F.log_softmax(pred / T, dim=1), F.softmax(teacher / T, dim=1), reduction="none").sum(-1)
        loss = weight * (T**2) * kl
        if not is_dn or state.ddf_scales is None:
            # The positive/negative balance comes from the latest non-denoising output; denoising outputs reuse it,
            # as official DEIMv2 does (they only compute it themselves if no earlier output had a DDF term).
            batch_scale = 8 / output["pred_boxes"].shape[0]
            state.ddf_scales = ((mask.sum() * batch_scale) ** 0.5, ((~mask).sum() * batch_scale) ** 0.5)
        num_pos, num_neg = state.ddf_scales
        loss_pos = loss[mask].mean() if mask.any() else 0
        loss_neg = loss[~mask].mean() if (~mask).any() else 0
        return (loss_pos * num_pos + loss_neg * num_neg) / (num_pos + num_neg)


def _loss_boxes(output: dict, matched: _Matched, num_boxes: float) -> dict[str, Tensor]:
    """L1 on cxcywh and 1 − GIoU on xyxy of the matched boxes, both summed and divided by ``num_boxes``."""
    pred = output["pred_boxes"][matched.batch_idx, matched.query_idx]
    loss_bbox = F.l1_loss(pred, matched.boxes, reduction="none").sum() / num_boxes
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred)[:, None], box_cxcywh_to_xyxy(matched.boxes)[:, None])
    loss_giou = (1 - giou.flatten()).sum() / num_boxes
    return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}


def _paired_iou(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """IoU of row i of ``pred_boxes`` with row i of ``target_boxes`` (both [N, 4] cxcywh) → [N]."""
    # torchvision treats leading dims as a batch, so [N, 1, 4] pairs give [N, 1, 1] without an N×N matrix.
    return box_iou(box_cxcywh_to_xyxy(pred_boxes)[:, None], box_cxcywh_to_xyxy(target_boxes)[:, None]).flatten()


def _gather_matched(targets: list[dict], indices: Indices, device: torch.device) -> _Matched:
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)
    query_idx = torch.cat([q for q, _ in indices]).to(device)
    labels = torch.cat([t["labels"][g.to(t["labels"].device)] for t, (_, g) in zip(targets, indices, strict=True)])
    boxes = torch.cat([t["boxes"][g.to(t["boxes"].device)] for t, (_, g) in zip(targets, indices, strict=True)])
    return _Matched(batch_idx, query_idx, labels.to(device), boxes.to(device))


def _union_indices(matchings: list[Indices]) -> Indices:
    """Per image, each query's most frequent ground truth over several matchings ("go" indices).

    Ties between pairs of equal count keep the first in torch.unique's lexicographic order; the result is ordered by
    descending count, as official DEIMv2 builds it.
    """
    union = []
    for per_image in zip(*matchings, strict=True):
        pairs = torch.cat([torch.stack([q, g], dim=1) for q, g in per_image])  # [P, 2] (query, gt)
        unique, counts = torch.unique(pairs, dim=0, return_counts=True)
        ranked = unique[torch.argsort(counts, descending=True)]
        queries, first_of = torch.unique(ranked[:, 0], return_inverse=True)
        positions = torch.arange(len(ranked), device=ranked.device)
        first = torch.full_like(queries, len(ranked)).scatter_reduce(0, first_of, positions, reduce="amin")
        kept = ranked[first.sort().values]
        union.append((kept[:, 0], kept[:, 1]))
    return union


def _denoising_indices(dn_meta: dict, targets: list[dict]) -> Indices:
    """The k-th positive slot of every denoising group is matched to ground truth k."""
    indices = []
    for positive, target in zip(dn_meta["dn_positive_idx"], targets, strict=True):
        num_gt = len(target["labels"])
        gt = torch.arange(num_gt, dtype=torch.int64, device=positive.device).tile(dn_meta["dn_num_group"])
        indices.append((positive.long(), gt))
    return indices


def _mean_over_ranks(count: int, device: torch.device) -> float:
    """``count`` averaged over distributed ranks (when running with more than one), at least 1."""
    value = torch.tensor([float(count)], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value.clamp(min=1).item()


def build_criterion(variant: str, num_classes: int) -> DEIMCriterion:
    """The DEIMv2 criterion of ``variant`` with the official weights; atto/femto/pico train without FGL/DDF."""
    spec = get_variant(variant)
    weight_dict = {"loss_mal": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_fgl": 0.15, "loss_ddf": 1.5}
    losses = ("mal", "boxes", "local") if spec.use_local_losses else ("mal", "boxes")
    matcher = HungarianMatcher(matcher_change_epoch=spec.matcher_change_epoch)
    return DEIMCriterion(matcher, weight_dict, losses, num_classes, use_uni_set=spec.use_local_losses)
