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
from deim_lib.criterion.matcher import HungarianMatcher, Indices, host_to_device
from deim_lib.decoder.fdr import bbox2distance
from deim_lib.variants import get_variant

_LOSS_KEYS = {"mal": ("loss_mal",), "boxes": ("loss_bbox", "loss_giou"), "local": ("loss_fgl", "loss_ddf")}
_DDF_TEMPERATURE = 5.0
_KEY_SHIFT = 32  # a (query, gt) pair packed into one int64 key; both are far below 2**31


@dataclass
class _CallState:
    """Values shared between the outputs of one criterion call."""

    up: Tensor | None
    reg_scale: Tensor | None
    distilled: frozenset[int] = frozenset()  # ids of the output dicts that get a DDF term
    fgl_targets: tuple[Tensor, Tensor, Tensor] | None = None
    fgl_targets_dn: tuple[Tensor, Tensor, Tensor] | None = None
    ddf_scales: tuple[Tensor, Tensor] | None = None


@dataclass
class _Matched:
    """Matched (image, query) positions of one matching and their ground truth, flattened over the batch."""

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

        On an accelerator the host waits for the device twice per call: the matcher's one copy of every cost matrix
        and, with "local", one read of which layers equal their teacher (plus the box counts under
        torch.distributed); all matched indices reach the device in one non-blocking copy.
        """
        device = outputs["pred_logits"].device
        decoder_go = {"boxes", "local"} if self.use_uni_set else set()
        enc_go = {"boxes"} if self.use_uni_set else set()
        # (output, key suffix, losses that use the union matching), in official order; each has its own matching.
        plan = [(outputs, "", decoder_go)]
        plan += [(out, f"_aux_{i}", decoder_go) for i, out in enumerate(outputs.get("aux_outputs", []))]
        plan += [(outputs["pre_outputs"], "_pre", decoder_go)] if "pre_outputs" in outputs else []
        plan += [(out, f"_enc_{i}", enc_go) for i, out in enumerate(outputs.get("enc_aux_outputs", []))]
        dn_plan = [(out, f"_dn_{i}") for i, out in enumerate(outputs.get("dn_outputs", []))]
        dn_plan += (
            [(outputs["dn_pre_outputs"], "_dn_pre")] if "dn_outputs" in outputs and "dn_pre_outputs" in outputs else []
        )

        # Every matching is computed, moved to the device and gathered once; the outputs below share them.
        own = self.matcher([out for out, _, _ in plan], targets, epoch)
        distilled: frozenset[int] = frozenset()
        if "local" in self.losses:
            # Decided right after matching, whose host copy has just drained the device, so this read waits little.
            distilled = _distilled_outputs([out for out, _, _ in plan] + [out for out, _ in dn_plan])
        go = [_union_indices(own)] if self.use_uni_set else []
        dn_meta = outputs["dn_meta"] if dn_plan else None
        matched = _gather_matched(targets, [*own, *go], dn_meta, device)
        counts = [sum(len(t["labels"]) for t in targets)] + [len(matched[len(own)].batch_idx) for _ in go]
        num_boxes, *num_boxes_go = _mean_over_ranks(counts, device)
        go_pair = (matched[len(own)], num_boxes_go[0]) if go else None

        state = _CallState(up=outputs.get("up"), reg_scale=outputs.get("reg_scale"), distilled=distilled)
        losses: dict[str, Tensor] = {}
        for (out, suffix, go_losses), own_matched in zip(plan, matched[: len(own)], strict=True):
            losses |= self._output_losses(out, (own_matched, num_boxes), go_pair, go_losses, state, suffix)
        if dn_meta is not None:
            dn = (matched[-1], num_boxes * dn_meta["dn_num_group"])
            for out, suffix in dn_plan:
                losses |= self._output_losses(out, dn, dn, set(), state, suffix, is_dn=True)
        if not losses:
            return {}
        # A NaN term (e.g. an empty side of a mean) must not poison the sum; inf is kept so divergence stays visible.
        values = torch.stack(list(losses.values()))
        return dict(zip(losses, torch.where(values.isnan(), 0.0, values).unbind(), strict=True))

    def _output_losses(
        self,
        output: dict,
        own: tuple[_Matched, float],
        go: tuple[_Matched, float] | None,
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
            matched, num_boxes = go if loss in go_losses else own
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
        # Set by indexing: F.one_hot would check the label range by reading the labels on the host.
        one_hot = torch.zeros(logits.shape, dtype=torch.int64, device=logits.device)
        one_hot[(*pos, matched.labels)] = 1
        quality = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        quality[pos] = iou.to(logits.dtype)
        target = (quality.unsqueeze(-1) * one_hot).pow(self.gamma)
        weight = logits.sigmoid().detach().pow(self.gamma) * (1 - one_hot) + one_hot
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
        return {"loss_mal": loss.sum() / num_boxes}

    def _loss_local(
        self, output: dict, matched: _Matched, num_boxes: float, state: _CallState, is_dn: bool
    ) -> dict[str, Tensor]:
        """FGL on the matched edge distributions, plus DDF towards the teacher (final layer) for distilled outputs."""
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
        if id(output) in state.distilled:
            terms["loss_ddf"] = self._loss_ddf(output, pos, iou, state, is_dn)
        return terms

    def _loss_ddf(
        self, output: dict, pos: tuple[Tensor, Tensor], iou: Tensor, state: _CallState, is_dn: bool
    ) -> Tensor:
        """Decoupled distillation: KL from the teacher's edge distributions, matched and unmatched edges balanced."""
        bins = self.reg_max + 1
        pred = output["pred_corners"].reshape(-1, bins)  # [B·Q·4, R+1]
        teacher = output["teacher_corners"].reshape(-1, bins).detach()
        weight = output["teacher_logits"].detach().sigmoid().amax(dim=-1)  # [B, Q]
        weight[pos] = iou.to(weight.dtype)
        mask = torch.zeros_like(weight, dtype=torch.bool)
        mask[pos] = True
        weight, mask = weight.flatten().repeat_interleave(4), mask.flatten().repeat_interleave(4)
        T = _DDF_TEMPERATURE
        kl = F.kl_div(F.log_softmax(pred / T, dim=1), F.softmax(teacher / T, dim=1), reduction="none").sum(-1)
        loss = weight * (T**2) * kl
        num_matched, num_unmatched = mask.sum(), (~mask).sum()
        if not is_dn or state.ddf_scales is None:
            # The positive/negative balance comes from the latest non-denoising output; denoising outputs reuse it,
            # as official DEIMv2 does (they only compute it themselves if no earlier output had a DDF term).
            batch_scale = 8 / output["pred_boxes"].shape[0]
            state.ddf_scales = ((num_matched * batch_scale) ** 0.5, (num_unmatched * batch_scale) ** 0.5)
        num_pos, num_neg = state.ddf_scales
        # Masked means with the counts clamped: an empty side gives 0, as official DEIMv2's "else 0", without
        # reading the mask on the host (equal to the boolean-indexed means up to float summation order).
        loss_pos = torch.where(mask, loss, 0.0).sum() / num_matched.clamp(min=1)
        loss_neg = torch.where(mask, 0.0, loss).sum() / num_unmatched.clamp(min=1)
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


def _gather_matched(
    targets: list[dict], matchings: list[Indices], dn_meta: dict | None, device: torch.device
) -> list[_Matched]:
    """Each matching flattened over the batch with its ground truth, on ``device``; the denoising one last.

    The host-side indices of all matchings travel in one non-blocking copy and the ground truth of all of them is
    gathered with one indexing of the concatenated targets (``Indices`` hold per-image target positions).
    """
    num_gts = [len(t["labels"]) for t in targets]
    offsets = torch.tensor([0, *num_gts[:-1]], dtype=torch.int64).cumsum(0)  # image b's first row in the targets
    rows = [_flat_rows(indices, offsets) for indices in matchings]
    if dn_meta is not None:
        rows.append(_denoising_rows(dn_meta, num_gts, offsets))
    device_rows = host_to_device(torch.cat(rows, dim=1), device)  # [3, ΣN] (image, query, target row)
    labels = torch.cat([t["labels"] for t in targets]).to(device)[device_rows[2]]
    boxes = torch.cat([t["boxes"] for t in targets]).to(device)[device_rows[2]]
    sizes = [r.shape[1] for r in rows]
    parts = zip(device_rows.split(sizes, dim=1), labels.split(sizes), boxes.split(sizes), strict=True)
    matched = [_Matched(r[0], r[1], lab, box) for r, lab, box in parts]
    if dn_meta is not None:
        # The denoising queries are known on the device only; their rows carried placeholders.
        matched[-1].query_idx = torch.cat(dn_meta["dn_positive_idx"]).long().to(device)
    return matched


def _flat_rows(indices: Indices, offsets: Tensor) -> Tensor:
    """Per-image (query, target) CPU index pairs → int64 [3, N] rows (image, query, row in the concatenated targets)."""
    counts = [len(q) for q, _ in indices]
    sizes, total = torch.tensor(counts, dtype=torch.int64), sum(counts)
    images = torch.arange(len(indices)).repeat_interleave(sizes, output_size=total)
    queries = torch.cat([q for q, _ in indices])
    target_rows = torch.cat([g for _, g in indices]) + offsets.repeat_interleave(sizes, output_size=total)
    return torch.stack([images, queries, target_rows])


def _denoising_rows(dn_meta: dict, num_gts: list[int], offsets: Tensor) -> Tensor:
    """The k-th positive slot of every denoising group is matched to target k: int64 [3, G·ΣG_b] rows (image, −1, row)
    in the order of ``dn_meta["dn_positive_idx"]``, whose query positions stay on the device."""
    per_image = torch.tensor(num_gts, dtype=torch.int64)
    sizes, total = per_image * dn_meta["dn_num_group"], sum(num_gts) * dn_meta["dn_num_group"]
    images = torch.arange(len(num_gts)).repeat_interleave(sizes, output_size=total)
    starts = sizes.cumsum(0) - sizes
    within = torch.arange(total) - starts.repeat_interleave(sizes, output_size=total)  # slot within the image
    target_rows = offsets[images] + within % per_image.clamp(min=1)[images]
    return torch.stack([images, torch.full_like(images, -1), target_rows])


def _distilled_outputs(outputs: list[dict]) -> frozenset[int]:
    """ids of the outputs that get a DDF term: those with teacher corners not equal to their own corners.

    Official DEIMv2 skips an output whose corners equal the teacher's (``torch.equal``): the final layer, which is its
    own teacher (the very same tensor, so it is skipped without looking at the data), and every layer of a freshly
    initialised model, whose zero box heads make all layers' corners equal (so the others are compared by value, all
    with one host read). The one case the identity shortcut decides differently is a final layer with NaN corners,
    whose DDF term official DEIMv2 would compute as NaN and then zero.
    """
    compared = [
        out
        for out in outputs
        if "teacher_corners" in out and "pred_corners" in out and out["pred_corners"] is not out["teacher_corners"]
    ]
    if all(out["pred_corners"].device.type == "cpu" for out in compared):
        # Nothing to wait for on the CPU, and torch.equal stops at the first difference.
        differs = [not torch.equal(out["pred_corners"], out["teacher_corners"]) for out in compared]
    else:
        differs = torch.stack([_differs(out["pred_corners"], out["teacher_corners"]) for out in compared]).tolist()
    return frozenset(id(out) for out, differ in zip(compared, differs, strict=True) if differ)


def _differs(corners: Tensor, teacher: Tensor) -> Tensor:
    """0-dim bool tensor: not ``torch.equal`` (a NaN differs from everything, itself included)."""
    if corners.shape != teacher.shape:
        return torch.ones((), dtype=torch.bool, device=corners.device)
    return (corners != teacher).any()


def _union_indices(matchings: list[Indices]) -> Indices:
    """Per image, each query's most frequent ground truth over several matchings ("go" indices).

    Ordered by descending count, as official DEIMv2 builds it, ties broken the way torch's (unstable) CPU argsort of
    the image's counts breaks them: that order depends on each image's own counts vector, which is why this stays a
    loop over images (host-side CPU tensors only, so it never waits for the device).
    """
    union = []
    for per_image in zip(*matchings, strict=True):
        queries, gts = torch.cat([q for q, _ in per_image]), torch.cat([g for _, g in per_image])
        # One int64 key per (query, gt) pair: sorting keys sorts the pairs lexicographically, as unique(dim=0) does.
        keys, counts = torch.unique((queries << _KEY_SHIFT) | gts, return_counts=True)
        ranked = keys[torch.argsort(counts, descending=True)]
        ranked_queries, first_of = torch.unique(ranked >> _KEY_SHIFT, return_inverse=True)
        positions = torch.arange(len(ranked))
        first = torch.full_like(ranked_queries, len(ranked)).scatter_reduce(0, first_of, positions, reduce="amin")
        kept = ranked[first.sort().values]
        union.append((kept >> _KEY_SHIFT, kept & ((1 << _KEY_SHIFT) - 1)))
    return union


def _mean_over_ranks(counts: list[int], device: torch.device) -> list[float]:
    """Each count averaged over distributed ranks (when running with more than one), at least 1."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        # The float32 tensor path below gives the same numbers: counts this small are exact in float32.
        return [max(float(count), 1.0) for count in counts]
    values = host_to_device(torch.tensor(counts, dtype=torch.float32), device)
    dist.all_reduce(values)
    return (values / dist.get_world_size()).clamp(min=1).tolist()


def build_criterion(variant: str, num_classes: int) -> DEIMCriterion:
    """The DEIMv2 criterion of ``variant`` with the official weights; atto/femto/pico train without FGL/DDF."""
    spec = get_variant(variant)
    weight_dict = {"loss_mal": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_fgl": 0.15, "loss_ddf": 1.5}
    losses = ("mal", "boxes", "local") if spec.use_local_losses else ("mal", "boxes")
    matcher = HungarianMatcher(matcher_change_epoch=spec.matcher_change_epoch)
    return DEIMCriterion(matcher, weight_dict, losses, num_classes, use_uni_set=spec.use_local_losses)
