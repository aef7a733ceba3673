"""Progressive multimodal fine-tuning of a DEIMv2 detector: one explicit training loop, phase by phase.

Phases: 0 trains the base detector without text (skip it when you have a converged official checkpoint);
1 trains only the text fusion (LR 2e-4); 2 adds the class heads (5e-5); 3 (optional) the whole decoder (2e-5).
The backbone never trains after phase 0. Every phase starts from the previous phase's best weights.

    python train_progressive.py --config configs/neu_det.yaml --phase 1 --init my_deimv2_defects.pth
    python train_progressive.py --config configs/neu_det.yaml --phase 2   # picks up checkpoints/phase1_best.pth
    python train_progressive.py --config configs/neu_det.yaml --phase 2 --resume checkpoints/phase2_last.pth
    torchrun --nproc_per_node=4 train_progressive.py --config configs/neu_det.yaml --phase 1 --init base.pth
    python train_progressive.py --config configs/demo.yaml --phase all    # the CPU demo, phases 0 → 3
"""

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from deim_lib import PostProcessor, build_criterion, build_detector
from deim_lib.checkpoint import CheckpointError, load_detector_state
from deim_lib.data.dataset import DatasetError
from deim_lib.evaluate import evaluate_detector
from deim_lib.variants import get_variant
from multimodal.checkpointing import (
    StartPoint,
    phase_checkpoint_path,
    prepare_output_dir,
    resolve_start,
    restore_training_state,
    save_training_checkpoint,
)
from multimodal.config import ConfigError, PhaseConfig, TrainConfig, config_to_dict, load_config
from multimodal.distributed import (
    DeviceError,
    all_ranks_agree,
    barrier,
    broadcast_object,
    cleanup_distributed,
    replicas_identical,
    setup_distributed,
    unwrap,
)
from multimodal.loaders import build_datasets, build_train_loader, build_val_loader, prepare_synthetic_data
from multimodal.model import MultimodalDetector, attach_text, detector_parts, load_weights
from multimodal.monitor import ForgettingMonitor
from multimodal.optimization import ModelEMA, build_optimizer, lr_factor, set_lr
from multimodal.phases import apply_phase, compile_frozen_parts, constant_parameters
from multimodal.text_encoder import TextEmbeddings, TextEncoderError, load_text_embeddings


class TrainingError(RuntimeError):
    """The run had to stop (e.g. repeated non-finite losses); the message says what was kept."""


USER_ERRORS = (ConfigError, CheckpointError, DatasetError, TextEncoderError, DeviceError, TrainingError, OSError)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (values only; see multimodal/config.py)")
    parser.add_argument("--phase", required=True, choices=["0", "1", "2", "3", "all"])
    parser.add_argument("--init", help="weights to start from: an official DEIMv2 .pth or a checkpoint of ours")
    parser.add_argument("--resume", help="phaseN_last.pth to continue, or a phase N-1 checkpoint to start phase N")
    parser.add_argument("--output-dir", default="checkpoints")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the starting weights and exit")
    return parser.parse_args(argv)


@dataclass
class Run:
    """What every phase of one invocation shares (built once in ``main``)."""

    config: TrainConfig
    output_dir: Path
    device: torch.device
    is_main: bool
    rank: int
    world_size: int
    seed: int
    class_names: list[str]
    image_size: int

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)


def float32(outputs):
    """The model's outputs with bf16 tensors upcast: the DEIMv2 loss is computed in float32."""
    if isinstance(outputs, dict):
        return {key: float32(value) for key, value in outputs.items()}
    if isinstance(outputs, list | tuple):
        return type(outputs)(float32(value) for value in outputs)
    if isinstance(outputs, torch.Tensor) and outputs.dtype == torch.bfloat16:
        return outputs.float()
    return outputs


def train_one_epoch(model, criterion, loader, optimizer, ema, run: Run, phase: PhaseConfig, state: dict, save_fn):
    """One pass over ``loader``; ``state`` holds the phase's global step and non-finite counters (updated in place).

    Returns the epoch's mean losses, or None when too many non-finite losses in a row ask the run to stop.
    """
    total_steps = phase.epochs * len(loader.batch_sampler)
    use_amp = phase.amp and run.device.type == "cuda"
    sums, count, seen, rate, start = {}, 0, 0, 0.0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {state['epoch']}", disable=not run.is_main, leave=False)
    for images, targets in bar:
        images = images.to(run.device, non_blocking=True)
        targets = [{k: v.to(run.device, non_blocking=True) for k, v in t.items()} for t in targets]
        factor = lr_factor(
            state["step"], total_steps, phase.warmup_iters, phase.scheduler, phase.flat_fraction, phase.min_lr_ratio
        )
        set_lr(optimizer, factor)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=use_amp):
            outputs = model(images, targets)
        losses = criterion(float32(outputs) if use_amp else outputs, targets, epoch=state["epoch"])
        loss = sum(losses.values())

        optimizer.zero_grad(set_to_none=True)
        state["batch"] += 1  # position in the epoch (what resuming skips), whether or not the step is taken
        if not all_ranks_agree(bool(torch.isfinite(loss)), run.device):
            state["nonfinite_in_a_row"] += 1
            state["nonfinite_total"] += 1
            run.log(f"warning: non-finite loss at step {state['step']}; step skipped")
            if state["nonfinite_in_a_row"] >= state["max_nonfinite"]:
                return None
            continue
        state["nonfinite_in_a_row"] = 0
        loss.backward()
        if phase.grad_clip > 0:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, phase.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(unwrap(model))
        state["step"] += 1

        count += 1
        seen += len(images) * run.world_size
        for name, value in (("loss", loss), *losses.items()):
            sums[name] = sums.get(name, 0.0) + value.detach()  # stays on the device: no sync per term
        rate = seen / (time.perf_counter() - start)
        if count % 10 == 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", img_s=f"{rate:.1f}")
        if phase.checkpoint_every_steps and state["step"] % phase.checkpoint_every_steps == 0:
            save_fn()
    means = {name: float(value) / max(1, count) for name, value in sums.items()}
    return means | {"images_per_s": rate, "seconds": time.perf_counter() - start}


def evaluate(model, run: Run, val: tuple) -> dict:
    val_loader, val_dataset, postprocessor = val
    metrics, _ = evaluate_detector(
        model, postprocessor, val_loader, run.device, val_dataset.category_ids, val_dataset.coco, progress=run.is_main
    )
    return metrics


def build_optimization(index: int, lr: float, model, parts: dict, policy, run: Run) -> tuple:
    """AdamW over exactly this phase's trainable parameters, and an EMA restarted for the phase (or None)."""
    phase, variant = run.config.phase(index), get_variant(run.config.model.variant)
    backbone_lr_ratio = variant.backbone_lr / variant.base_lr  # only phase 0 trains the backbone
    fused = run.device.type == "cuda"
    optimizer = build_optimizer(parts, phase.trainable, lr, phase.weight_decay, backbone_lr_ratio, fused=fused)
    if not phase.ema:
        return optimizer, None
    names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    tracked = [name for name in names if name not in policy.frozen_tensors]
    return optimizer, ModelEMA(model, tracked, phase.ema_decay, phase.ema_warmups)


def wrap_distributed(model, run: Run, trainable: list[str]):
    """DDP around the model after freezing, per phase: it registers gradient hooks for what is trainable now."""
    if run.world_size == 1:
        return model
    device_ids = [run.device.index] if run.device.type == "cuda" else None
    # Training the decoder, a batch without boxes leaves the denoising embedding unused.
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters="decoder" in trainable)


def measure_baseline(model, run: Run, monitor: ForgettingMonitor, val: tuple, index: int) -> None:
    """The forgetting monitor's reference: the model before it trains (with zero gates, exactly the base detector)."""
    metrics = evaluate(model, run, val)
    if run.is_main:
        monitor.save_baseline(metrics, f"start of phase {index}")
    run.log(f"baseline (base detector): AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}")


def epoch_summary(index: int, epoch: int, stats: dict, metrics: dict, record: dict, gates: list, state: dict) -> str:
    line = f"phase {index} epoch {epoch}: loss {stats.get('loss', float('nan')):.4f}  AP {metrics['AP']:.4f}  "
    line += f"AP50 {metrics['AP50']:.4f}"
    if "delta_AP" in record:
        line += f"  ΔAP {record['delta_AP']:+.4f}"
    line += f"  {stats['images_per_s']:.1f} img/s"
    if gates:
        line += f"  gates {[round(gate, 4) for gate in gates]}"
    if state["nonfinite_total"]:
        line += f"  non-finite steps {state['nonfinite_total']}"
    return line


def model_parts(model) -> dict:
    return model.parts() if isinstance(model, MultimodalDetector) else detector_parts(model)


def run_phase(index: int, model, constants, start: StartPoint, run: Run, monitor: ForgettingMonitor, val, text) -> None:
    """Train one phase: freeze, optimiser and EMA over the trainable parts, epochs of train → evaluate → save."""
    phase, variant = run.config.phase(index), get_variant(run.config.model.variant)
    multimodal = isinstance(model, MultimodalDetector)
    parts = model_parts(model)
    decoder = model.detector.decoder if multimodal else model.decoder
    output_switches = (decoder, decoder.decoder)
    policy = apply_phase(model, parts, phase.trainable, constants)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lr = phase.lr if phase.lr is not None else variant.base_lr
    run.log(f"phase {index}: training {phase.trainable} ({trainable:,} parameters), lr {lr:g}")

    optimizer, ema = build_optimization(index, lr, model, parts, policy, run)
    if run.config.compile_frozen:
        compiled = compile_frozen_parts(parts)
        if ema is not None:
            compile_frozen_parts(model_parts(ema.module), compiled)  # the EMA copy evaluates: the same parts
        run.log(f"phase {index}: torch.compile on the frozen parts {compiled}")
    state = {"epoch": 0, "step": 0, "batch": 0, "nonfinite_in_a_row": 0, "nonfinite_total": 0}
    state["max_nonfinite"] = run.config.monitor.max_nonfinite_steps
    history, best = [], None
    if start.resume:
        history, best = restore_training_state(start.resume, model, ema, optimizer, state)
    net = wrap_distributed(model, run, phase.trainable)
    criterion = build_criterion(variant.name, len(run.class_names)).to(run.device)
    train_dataset = build_datasets(run.config.data, variant, run.image_size, phase.augmentation)[0]
    eval_model = ema.module if ema is not None else model

    if index >= 1 and broadcast_object(monitor.baseline is None):
        measure_baseline(model, run, monitor, val, index)
    last_path, best_path = (phase_checkpoint_path(run.output_dir, index, kind) for kind in ("last", "best"))
    described = {"config": config_to_dict(run.config), "variant": variant.name, "class_names": run.class_names}
    described |= {"image_size": run.image_size, "phase": index}
    if text is not None:
        described["text_embeddings"] = text.to_dict()

    def save(path: Path, finished: bool = False) -> None:
        progress = {"step": state["step"], "last_epoch": state["epoch"] - 1, "state": dict(state)}
        progress |= {"history": history, "best_metric": best, "finished": finished}
        if run.is_main:
            save_training_checkpoint(path, model, ema, optimizer, **described, **progress)

    for epoch in range(state["epoch"], phase.epochs):
        state["epoch"] = epoch
        loader, sampler = build_train_loader(
            train_dataset,
            run.config.data,
            variant,
            run.image_size,
            phase.augmentation,
            run.seed,
            epoch,
            run.rank,
            run.world_size,
        )
        sampler.start = state["batch"]
        policy.set_train_mode(net, output_switches)
        stats = train_one_epoch(net, criterion, loader, optimizer, ema, run, phase, state, lambda: save(last_path))
        if stats is None:
            raise TrainingError(
                f"phase {index}: {state['max_nonfinite']} non-finite losses in a row at step {state['step']}; "
                f"stopped, the last good checkpoint {last_path} is kept (lower phase{index}.lr?)"
            )
        state["epoch"], state["batch"] = epoch + 1, 0
        metrics = evaluate(eval_model, run, val)
        gates = eval_model.fusion.gate_values() if multimodal else []  # the gates of the evaluated weights
        record = monitor.record(index, epoch, metrics, gates, stats) if run.is_main else {}
        history.append({"epoch": epoch, "AP": metrics["AP"], "AP50": metrics["AP50"]})
        score = metrics[run.config.monitor.best_metric]
        improved = best is None or score > best
        best = score if improved else best
        save(last_path)
        if improved:
            save(best_path)
        run.log(epoch_summary(index, epoch, stats, metrics, record, gates, state))
        if broadcast_object(run.is_main and monitor.exceeded(record)):
            run.log(f"warning: AP {metrics['AP']:.4f} is more than max_ap_drop {monitor.max_ap_drop} below the base")
            if run.config.monitor.on_drop == "stop":
                run.log(f"phase {index} stopped by the forgetting guard; {best_path} keeps the best weights")
                break
    checked = policy.verify_frozen(model)
    if not replicas_identical(model, run.device):
        raise TrainingError(f"phase {index}: the {run.world_size} processes ended with different weights")
    replicas = f", weights identical on {run.world_size} processes" if run.world_size > 1 else ""
    run.log(f"phase {index} done: {checked} frozen tensors verified bit-identical{replicas}")
    save(last_path, finished=True)
    if run.is_main:
        monitor.write_report(report_notes(run.config))


def report_notes(config: TrainConfig) -> list[str]:
    text = config.text_encoder
    if text.precomputed:
        return [f"Text embeddings: precomputed file {text.precomputed}."]
    if text.pretrained is None:
        return [f"Text embeddings: open_clip {text.model} with RANDOM weights (text_encoder.pretrained: null)."]
    return [f"Text embeddings: open_clip {text.model}, weights {text.pretrained}."]


def class_text_embeddings(run: Run, start: StartPoint) -> TextEmbeddings:
    """The start point's cached embeddings when they describe the same classes, else computed (once, on rank 0)."""
    if start.text_embeddings is not None and start.text_embeddings["class_names"] == run.class_names:
        run.log("text embeddings: taken from the checkpoint (no text model needed)")
        return TextEmbeddings.from_dict(start.text_embeddings)
    text = run.config.text_encoder
    prompts = dict(run.config.data.classes) or {name: [name] for name in run.class_names}
    result = None
    if run.is_main:
        cache_dir = Path(text.cache_dir) if text.cache_dir else run.output_dir / "text_cache"
        result = load_text_embeddings(prompts, text.templates, text.model, text.pretrained, cache_dir, text.precomputed)
        run.log(f"text embeddings: {result.source}, {tuple(result.embeddings.shape)}")
        if text.pretrained is None and text.precomputed is None:
            run.log("note: the CLIP text tower has RANDOM weights (text_encoder.pretrained: null); set it to 'openai'")
    return TextEmbeddings.from_dict(broadcast_object(result.to_dict() if result else None))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Config, distributed context, output directory, seeds.
        config = load_config(args.config, args.set)
        context = setup_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if config.data.batch_size % context.world_size:
            raise ConfigError(
                f"data.batch_size {config.data.batch_size} is the global batch and must divide evenly over "
                f"{context.world_size} processes"
            )
        output_dir = prepare_output_dir(args.output_dir)
        random.seed(args.seed + context.rank)
        np.random.seed(args.seed + context.rank)
        torch.manual_seed(args.seed + context.rank)

        # Data: the validation set fixes the class list; training sets are built per phase (augmentation differs).
        if context.is_main and prepare_synthetic_data(config.data):
            tqdm.write(f"generated the synthetic defect dataset in {config.data.synthetic_dir}")
        barrier()
        variant = get_variant(config.model.variant)
        image_size = config.model.image_size or variant.eval_size[0]
        val_dataset = build_datasets(config.data, variant, image_size, "finetune")[1]
        run = Run(
            config,
            output_dir,
            context.device,
            context.is_main,
            context.rank,
            context.world_size,
            args.seed,
            val_dataset.class_names,
            image_size,
        )
        run.log(f"config: {json.dumps(config_to_dict(config))}")
        val_loader = build_val_loader(
            val_dataset, config.data.val_batch_size, config.data.num_workers, context.rank, context.world_size
        )
        val = (val_loader, val_dataset, PostProcessor(len(run.class_names)))

        # Model: the DEIMv2 detector; phases ≥ 1 wrap it with the text fusion.
        detector = build_detector(variant.name, len(run.class_names), eval_size=(image_size, image_size))
        if context.world_size > 1 and context.device.type == "cuda":
            # As official DEIMv2 (sync_bn): batch statistics over all GPUs when BatchNorm trains (phase 0).
            detector = torch.nn.SyncBatchNorm.convert_sync_batchnorm(detector)
        constants = constant_parameters(detector)
        model, text = detector, None
        monitor = ForgettingMonitor(output_dir, config.monitor.max_ap_drop)
        phases = [0, 1, 2, 3] if args.phase == "all" else [int(args.phase)]
        for position, index in enumerate(phases):
            first = position == 0
            start = resolve_start(
                index, args.resume if first else None, args.init if first else None, output_dir, config.model.weights
            )
            run.log(f"phase {index}: starting from {start.description}")
            if start.detector_state is not None:
                reset = load_detector_state(
                    detector, start.detector_state, start.description, config.model.reinit_class_heads
                )
                if reset:
                    run.log(f"re-initialised for the new class count: {', '.join(reset)}")
            elif start.resume is None and config.model.pretrained_backbone:
                detector.backbone.load_pretrained(config.model.pretrained_backbone)
            if index >= 1 and text is None:
                text = class_text_embeddings(run, start)
                model = attach_text(
                    detector, text.embeddings, config.fusion.num_heads, config.fusion.text_aware_classification
                )
            if start.fusion_state is not None and model is not detector:
                load_weights(model, None, start.fusion_state, start.description)
            model.to(context.device)
            if args.eval_only:
                metrics = evaluate(model, run, val)
                run.log(f"metrics: {json.dumps(metrics)}")
                return 0
            run_phase(index, model, constants, start, run, monitor, val, text)
        run.log("\n" + monitor.summary_table())
        return 0
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
