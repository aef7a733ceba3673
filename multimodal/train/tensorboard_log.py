"""TensorBoard scalars of a run, in ``<output_dir>/tensorboard/phaseN/`` (``tensorboard --logdir <output_dir>``).

Every ``every_steps`` optimiser steps: the loss, each kind of loss term summed over the decoder layers
(``train/loss_mal``, ``train/loss_bbox``, …), every single term (``train_terms/``) and the LR. Every epoch, at its
last step: AP, AP50, ΔAP against the base detector, per-class AP, the fusion's added signal per level and the text
reliance.
The x axis is the phase's optimiser step, so the epoch points sit on the loss curves. A resumed phase purges the
points its interrupted run wrote after the resume point, so replayed steps are not drawn twice.
"""

from pathlib import Path

import torch
from torch import Tensor

from multimodal.train.records import EpochRecord


class TensorBoardLog:
    """One phase's event files; a disabled log (another process than the main one, or ``monitor.tensorboard: false``)
    writes nothing and costs nothing."""

    def __init__(self, output_dir: Path, phase: int, every_steps: int, resumed_at_step: int | None, enabled: bool):
        self.phase, self.every_steps = phase, every_steps
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when it writes

            self.writer = SummaryWriter(output_dir / "tensorboard" / f"phase{phase}", purge_step=resumed_at_step)

    def step(self, step: int, losses: dict[str, Tensor], lr: float) -> None:
        """After optimiser step ``step`` (1-based): loss terms and LR, every ``every_steps`` steps (one host sync)."""
        if self.writer is None or step % self.every_steps:
            return
        terms = torch.stack([value.detach() for value in losses.values()]).tolist()  # one host sync for all terms
        values = dict(zip(losses, terms, strict=True))
        kinds: dict[str, float] = {}
        for name, value in values.items():
            kind = "_".join(name.split("_")[:2])  # loss_mal_aux_0 → loss_mal
            kinds[kind] = kinds.get(kind, 0.0) + value
            self.writer.add_scalar(f"train_terms/{name}", value, step)
        for kind, value in {"loss": sum(values.values()), **kinds}.items():
            self.writer.add_scalar(f"train/{kind}", value, step)
        self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, record: EpochRecord) -> None:
        """One epoch's record, at the epoch's last step."""
        if self.writer is None:
            return
        step = record.train["step"]
        scalars = {"val/AP": record.AP, "val/AP50": record.AP50, "train/epoch_loss": record.train.get("loss")}
        scalars |= {"val/delta_AP": record.delta_AP, "val/delta_AP50": record.delta_AP50}
        # COCO marks the AP of a class without validation boxes as -1: left out.
        scalars |= {f"per_class_AP/{name}": v["AP"] for name, v in record.per_class.items() if v["AP"] >= 0}
        text = record.text
        scalars |= {f"text/added_signal_level{i}": ratio for i, ratio in enumerate(text.added_signal or [])}
        reliance = text.reliance.to_dict() if text.reliance is not None else {}
        scalars |= {f"text/reliance_{key}": value for key, value in reliance.items()}
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
