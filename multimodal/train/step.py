"""One phase's moving parts and its training step: the code ``train_progressive.py`` loops over and
``benchmarks/throughput.py`` times, so that a benchmark figure describes the real step.
"""

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from deim_lib import build_criterion
from deim_lib.errors import CheckpointError, UserError
from deim_lib.variants import Variant
from multimodal.config import PhaseConfig
from multimodal.model.detector import load_weights, split_state
from multimodal.phase_table import PHASES, PhaseRule
from multimodal.train.checkpoint import (
    PhaseCheckpoint,
    PhaseProgress,
    RunInfo,
    rng_state,
    save_phase_checkpoint,
    set_rng_state,
)
from multimodal.train.distributed import all_ranks_agree, unwrap, wrap_distributed
from multimodal.train.freezing import PhasePolicy, apply_phase, compile_frozen_parts
from multimodal.train.optimization import ModelEMA, build_optimizer


@dataclass(frozen=True)
class Phase:
    """One phase: its rule (the phase table's row), its config section and what it trains with. ``net`` is ``model``
    itself, or its DistributedDataParallel wrapper."""

    rule: PhaseRule
    config: PhaseConfig
    model: nn.Module
    net: nn.Module
    parts: dict[str, list[nn.Module]]
    policy: PhasePolicy
    optimizer: torch.optim.AdamW
    ema: ModelEMA | None
    criterion: nn.Module
    lr: float
    use_amp: bool

    @property
    def index(self) -> int:
        return self.rule.index

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and kept as "best": the EMA when the phase has one."""
        return self.ema.module if self.ema is not None else self.model

    def train_mode(self) -> None:
        """Train mode for what trains; frozen parts stay in eval mode (the decoder's output switches follow)."""
        decoder = self.parts["decoder"][0]
        self.policy.set_train_mode(self.net, (decoder, decoder.decoder))

    def frozen_parts(self) -> list[str]:
        """The parts with no trainable parameter in this phase."""
        return [
            name
            for name, modules in self.parts.items()
            if not any(p.requires_grad for module in modules for p in module.parameters())
        ]

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def build_phase(
    *,
    index: int,
    config: PhaseConfig,
    model: nn.Module,
    constants: frozenset[int],
    variant: Variant,
    num_classes: int,
    device: torch.device,
    world_size: int = 1,
    compile_frozen: bool = False,
) -> Phase:
    """Freeze all but ``config.trainable``, then AdamW over what trains, the phase's EMA, criterion and DDP wrapper.

    ``model`` is on ``device``; ``constants`` come from ``constant_parameters`` on the freshly built detector. LR and
    weight decay left at None take the variant's DEIMv2 recipe (phase 0); the backbone trains at the variant's ratio.
    """
    parts = model.parts()
    policy = apply_phase(model, parts, config.trainable, constants)
    lr = config.lr if config.lr is not None else variant.base_lr
    weight_decay = config.weight_decay if config.weight_decay is not None else variant.weight_decay
    backbone_lr_ratio = variant.backbone_lr / variant.base_lr
    fused = device.type == "cuda"
    optimizer = build_optimizer(parts, config.trainable, lr, weight_decay, backbone_lr_ratio, fused=fused)
    ema = None
    if config.ema:
        names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
        tracked = [name for name in names if name not in policy.frozen_tensors]
        ema = ModelEMA(model, tracked, config.ema_decay, config.ema_warmups)
    if compile_frozen:
        compiled = compile_frozen_parts(parts)
        if ema is not None:
            compile_frozen_parts(ema.module.parts(), compiled)  # the EMA copy evaluates: the same parts
    net = wrap_distributed(model, device, world_size, find_unused="decoder" in config.trainable)
    criterion = build_criterion(variant.name, num_classes).to(device)
    use_amp = uses_bf16(config.amp, config.amp_on_cpu, device)
    return Phase(
        rule=PHASES[index],
        config=config,
        model=model,
        net=net,
        parts=parts,
        policy=policy,
        optimizer=optimizer,
        ema=ema,
        criterion=criterion,
        lr=lr,
        use_amp=use_amp,
    )


def uses_bf16(amp: bool, amp_on_cpu: bool, device: torch.device) -> bool:
    """Whether a step on ``device`` runs its forward under bf16 autocast: with ``amp`` on CUDA, and on any other device
    only when also ``amp_on_cpu`` (bf16 is not faster on the CPU for these models, docs/speed_notes.md)."""
    return amp and (device.type == "cuda" or amp_on_cpu)


def float32(outputs):
    """The model's outputs with bf16 tensors upcast: the DEIMv2 loss is computed in float32."""
    if isinstance(outputs, dict):
        return {key: float32(value) for key, value in outputs.items()}
    if isinstance(outputs, list | tuple):
        return type(outputs)(float32(value) for value in outputs)
    if isinstance(outputs, Tensor) and outputs.dtype == torch.bfloat16:
        return outputs.float()
    return outputs


def _no_lap(part: str) -> None:
    """Part timing switched off (the benchmark passes a timer)."""


def train_step(
    phase: Phase, images: Tensor, targets: list[dict], epoch: int, lap: Callable[[str], None] = _no_lap
) -> tuple[dict[str, Tensor], bool]:
    """Forward (under bf16 autocast on the images' device when ``phase.use_amp``), DEIMv2 loss in float32, backward,
    clipping, AdamW and EMA.

    Returns the weighted loss terms (device tensors) and whether the step was taken. It is skipped on every rank
    when any rank sees a non-finite loss, output or gradient norm: the criterion zeroes NaN terms as official DEIMv2
    does, so the loss alone would hide a diverged model. ``lap(part)`` is called after each part.
    """
    # No autocast context at all in float32: torch.autocast refuses device types it has no rules for, even disabled.
    # Forward: the model's outputs (and, in training mode, the denoising and auxiliary ones).
    precision = torch.autocast(images.device.type, dtype=torch.bfloat16) if phase.use_amp else nullcontext()
    with precision:
        outputs = phase.net(images, targets)
    outputs = float32(outputs) if phase.use_amp else outputs
    lap("forward")
    # Loss: DEIMv2's weighted terms.
    losses = phase.criterion(outputs, targets, epoch=epoch)
    loss = sum(losses.values())
    lap("criterion")
    # Backward, then the gradient norm (clipped when grad_clip > 0).
    phase.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    lap("backward")
    params = [p for group in phase.optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if phase.config.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, phase.config.grad_clip, grad_norm)
    checked = torch.stack(
        [loss.detach(), grad_norm, outputs["pred_logits"].detach().sum(), outputs["pred_boxes"].detach().sum()]
    )
    # Step: only when everything is finite on every rank; then the EMA follows the new weights.
    if not all_ranks_agree(bool(torch.isfinite(checked).all()), images.device):  # the step's one host sync
        return losses, False
    phase.optimizer.step()
    lap("optimizer")
    if phase.ema is not None:
        phase.ema.update(unwrap(phase.net))
        lap("ema")
    return losses, True


class TrainingError(UserError):
    """The run had to stop (e.g. a diverged model); the message says why and what was kept."""


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``module`` that hold a NaN or an infinity."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    return [name for name, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def checkpoint_now(
    phase: Phase, info: RunInfo, progress: PhaseProgress, text: dict | None, kind: str, finished: bool = False
) -> PhaseCheckpoint:
    """The phase's checkpoint at this moment; the weights are checked finite first: a diverged model is never saved."""
    for module, what in ((phase.model, "weights"), (phase.ema.module if phase.ema else None, "EMA weights")):
        bad = nonfinite_tensors(module) if module is not None else []
        if bad:
            raise TrainingError(f"phase {phase.index}: the {what} hold NaN or inf (e.g. {bad[0]}); not saved")
    detector, fusion = split_state(phase.model.state_dict())
    ema_detector, ema_fusion = split_state(phase.ema.module.state_dict()) if phase.ema else (None, None)
    last = kind == "last"
    return PhaseCheckpoint(
        phase=phase.index,
        kind=kind,
        info=info,
        progress=progress,
        detector=detector,
        fusion=fusion,
        ema_detector=ema_detector,
        ema_fusion=ema_fusion,
        ema_updates=phase.ema.updates if phase.ema else 0,
        text_embeddings=text,
        finished=finished,
        optimizer=phase.optimizer.state_dict() if last else None,
        rng=rng_state() if last else None,
    )


def save_checkpoint(
    phase: Phase,
    info: RunInfo,
    progress: PhaseProgress,
    text: dict | None,
    path: Path,
    kind: str,
    finished: bool = False,
    writes: bool = True,
) -> None:
    """``checkpoint_now`` (on every process: each checks its weights) written atomically to ``path`` when
    ``writes`` (the main process)."""
    checkpoint = checkpoint_now(phase, info, progress, text, kind, finished)
    if writes:
        save_phase_checkpoint(path, checkpoint)


def restore_phase(phase: Phase, checkpoint: PhaseCheckpoint) -> PhaseProgress:
    """Continue ``checkpoint`` exactly. Its training weights were loaded before the phase froze its parts (so the
    frozen snapshot holds them); the EMA weights, optimiser state, counters and RNG streams come back here."""
    if phase.ema is not None:
        if checkpoint.ema_detector is None:
            raise CheckpointError("--resume: the checkpoint has no EMA weights but this phase uses EMA (phaseN.ema)")
        load_weights(phase.ema.module, checkpoint.ema_detector, checkpoint.ema_fusion, "--resume (EMA)")
        phase.ema.updates = checkpoint.ema_updates
    try:
        phase.optimizer.load_state_dict(checkpoint.optimizer)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"--resume: the optimizer state does not fit this phase's parameters ({error})") from None
    set_rng_state(checkpoint.rng)
    return checkpoint.progress
