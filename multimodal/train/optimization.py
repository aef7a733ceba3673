"""A phase's optimiser (AdamW over exactly the trainable parameters), its LR schedule and the EMA of its weights."""

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn


def build_optimizer(
    named_parts: dict[str, Sequence[nn.Module]],
    trainable: Sequence[str],
    lr: float,
    weight_decay: float,
    backbone_lr_ratio: float = 1.0,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW with one named group per (part, decay) pair; norms, biases and other 1-d tensors get no weight decay.

    Only parameters with ``requires_grad`` enter, each once, so the optimiser state in a checkpoint covers exactly
    what the phase trains. The backbone (phase 0 only) trains at ``lr * backbone_lr_ratio``, as DEIMv2 does.
    """
    seen: set[int] = set()
    groups = []
    for part in trainable:
        decay, no_decay = [], []
        for module in named_parts[part]:
            for parameter in module.parameters():
                if parameter.requires_grad and id(parameter) not in seen:
                    seen.add(id(parameter))
                    (no_decay if parameter.ndim <= 1 else decay).append(parameter)
        part_lr = lr * (backbone_lr_ratio if part == "backbone" else 1.0)
        for suffix, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
            if params:
                groups.append({"name": f"{part}_{suffix}", "params": params, "lr": part_lr, "weight_decay": wd})
    if not groups:
        raise ValueError(f"the parts {list(trainable)} have no trainable parameters")
    for group in groups:
        group["base_lr"] = group["lr"]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, fused=fused)


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, scheduler: str, flat_fraction: float, min_ratio: float
) -> float:
    """Multiplier of the base LR at global ``step`` of a phase: quadratic warm-up, then cosine or flat-then-cosine.

    A pure function of the step, so resuming needs no scheduler state.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return ((step + 1) / warmup_steps) ** 2
    decay_start = max(warmup_steps, int(flat_fraction * total_steps)) if scheduler == "flatcosine" else warmup_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


class ModelEMA:
    """Exponential moving average of the trainable tensors of a model (DEIMv2's decay ramp d·(1 − e^(−n/warmups))).

    Only tensors that can change (trainable parameters and the buffers of non-frozen modules) are averaged; frozen
    tensors are copied once and stay bit-identical, which averaging x with itself would not guarantee.
    """

    def __init__(self, model: nn.Module, tracked: Sequence[str], decay: float = 0.9999, warmups: int = 1000):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.tracked = list(tracked)
        self.decay = decay
        self.warmups = warmups
        self.updates = 0
        self._source: nn.Module | None = None
        self._averaged: list[tuple[nn.Module, nn.Module, str]] = []
        self._copied: list[tuple[nn.Module, nn.Module, str]] = []

    def _resolve(self, model: nn.Module) -> None:
        """Find the (EMA module, model module, attribute) of every tracked name, once per source model.

        Walking all named tensors of the model on every update costs milliseconds; the owning modules do not change,
        and reading the attribute at each update still sees tensors that ``.to()`` or an assignment replaced.
        """
        self._averaged, self._copied = [], []
        for name in self.tracked:
            prefix, _, attribute = name.rpartition(".")
            owners = (self.module.get_submodule(prefix), model.get_submodule(prefix), attribute)
            floating = getattr(owners[0], attribute).is_floating_point()
            (self._averaged if floating else self._copied).append(owners)
        self._source = model

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every tracked floating tensor towards ``model``'s by 1 − d; copy the tracked integer ones."""
        if model is not self._source:
            self._resolve(model)
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.warmups))
        ema = [getattr(mine, attribute) for mine, _, attribute in self._averaged]
        torch._foreach_lerp_(ema, [getattr(theirs, attribute) for _, theirs, attribute in self._averaged], 1 - d)
        for mine, theirs, attribute in self._copied:
            getattr(mine, attribute).copy_(getattr(theirs, attribute))
