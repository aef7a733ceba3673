"""Progressive multimodal fine-tuning of a DEIMv2 detector: one explicit training loop, phase by phase.

Phases: 0 trains the base detector without text (skip it when you have a converged official checkpoint);
1 trains only the text fusion (LR 2e-4); 2 adds the class heads (5e-5); 3 (optional) the whole decoder (2e-5).
The backbone never trains after phase 0. Every phase starts from the previous phase's best weights.

    python train_progressive.py --config configs/neu_det.yaml --phase 1 --init my_deimv2_defects.pth
    python train_progressive.py --config configs/neu_det.yaml --phase 2   # starts from checkpoints/phase1_best.pth
    python train_progressive.py --resume checkpoints/phase2_last.pth      # continues with the config it stored
    torchrun --nproc_per_node=4 train_progressive.py --config configs/neu_det.yaml --phase 1 --init base.pth
    python train_progressive.py --config configs/demo.yaml --phase all    # the CPU demo, phases 0 → 3
"""

import argparse
import sys

from multimodal.phase_table import PHASE_INDICES, PHASES

EPILOG = """phases (defaults of the phaseN config sections):
{phases}

--set takes YAML values:  --set phase1.epochs=3  --set "phase2.trainable=[fusion, class_heads]"
                          --set text_encoder.pretrained=null  --set monitor.on_drop=stop
--print-config prints every key with its resolved value (multimodal/config.py says what each means)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    phases = "\n".join(
        f"  {rule.index}: {rule.purpose}; trains {', '.join(rule.trainable)} at lr {rule.lr or 'of the variant'}"
        for rule in PHASES
    )
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG.format(phases=phases), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--config",
        metavar="FILE",
        help="YAML file of config values (default: none, every value from multimodal/config.py; with --resume, "
        "the resumed run's own config, of which the file overrides the keys it gives)",
    )
    add(
        "--phase",
        choices=[*map(str, PHASE_INDICES), "all"],
        help="phase to run; all: 0 → 3 (required unless --resume names it)",
    )
    add(
        "--init",
        metavar="FILE",
        help="start the phase from these weights: an official DEIMv2 checkpoint or an "
        "earlier phase's checkpoint (default: phase{N-1}_best.pth in --output-dir, or model.weights)",
    )
    add(
        "--resume",
        metavar="FILE",
        help="continue the phase this phaseN_last.pth was written in, with the config it stored (default: none)",
    )
    add(
        "--output-dir",
        metavar="DIR",
        help="checkpoints, metrics and report, one base each (default: checkpoints, or the folder of --resume)",
    )
    add("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    add("--seed", type=int, metavar="N", help="seed of data order and new weights (default: 0, or the resumed run's)")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
    add("--eval-only", action="store_true", help="evaluate the weights the phase would start from, then exit")
    add("--per-class", action="store_true", help="--eval-only: print the AP of every class too")
    add(
        "--text-reliance",
        action="store_true",
        help="--eval-only: also evaluate with permuted and with averaged class texts (two more passes)",
    )
    add("--print-config", action="store_true", help="print the resolved config as YAML, then exit")
    # The usage line says what is required: a phase, or a resume point that names one.
    phase_choices = ",".join([*map(str, PHASE_INDICES), "all"])
    parser.usage = (
        f"%(prog)s (--phase {{{phase_choices}}} | --resume FILE) [--config FILE] [--init FILE] [--output-dir DIR]\n"
        "       [--device {cpu,cuda}] [--seed N] [--set KEY=VALUE ...] [--eval-only [--per-class] [--text-reliance]]\n"
        "       [--print-config] [-h]"
    )
    args = parser.parse_args(argv)
    if args.phase is None and args.resume is None and not args.print_config:
        parser.error("--phase is required (0, 1, 2, 3 or all), unless --resume FILE continues a phase")
    return args


if __name__ == "__main__":
    parse_args(sys.argv[1:])  # --help and usage errors answer here, before the heavy imports below (seconds)

import json
import random
import shlex
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from deim_lib import PostProcessor, build_detector
from deim_lib.checkpoint import load_detector_state
from deim_lib.cli import make_output_dir, report
from deim_lib.data.dataset import CocoDetection
from deim_lib.errors import UserError
from deim_lib.evaluate import evaluate_detector, format_table
from deim_lib.variants import Variant, get_variant
from multimodal.config import ConfigError, TrainConfig, changed_values, config_to_dict, config_to_yaml, load_config
from multimodal.data import loaders
from multimodal.files import file_sha256, remove_stale_temporaries
from multimodal.model.detector import MultimodalDetector, attach_text, load_weights
from multimodal.model.fusion import LevelFusion, TextAwareClassifier
from multimodal.model.text_encoder import TextEmbeddings, class_embeddings
from multimodal.model.text_usage import evaluate_with_text
from multimodal.train import distributed
from multimodal.train.checkpoint import (
    PhaseProgress,
    RunInfo,
    TrainingState,
    checkpoint_path,
    read_phase_checkpoint,
    save_phase_checkpoint,
)
from multimodal.train.freezing import constant_parameters
from multimodal.train.monitor import ForgettingMonitor, format_epoch, machine, signed
from multimodal.train.optimization import lr_factor, set_lr
from multimodal.train.start import StartPoint, check_resumable, resolve_start, resumed_config
from multimodal.train.step import PhaseSetup, TrainingError, checkpoint_now, restore_phase, setup_phase, train_step
from multimodal.train.tensorboard_log import TensorBoardLog


@dataclass(frozen=True)
class FusionDesigns:
    """The fusion design of one feature level and the text-aware classifier that phase 1 builds (experiments compare
    others: experiments/fusion_designs.py)."""

    level: type[torch.nn.Module] = LevelFusion
    classifier: type[torch.nn.Module] = TextAwareClassifier


@dataclass
class Run:
    """What every phase of one invocation shares (built once in ``main``)."""

    config: TrainConfig
    output_dir: Path
    context: distributed.DistributedContext
    info: RunInfo
    variant: Variant
    val_dataset: CocoDetection
    val_loader: torch.utils.data.DataLoader
    monitor: ForgettingMonitor
    phases: list[int]  # the phases this invocation runs, in order
    text: TextEmbeddings | None = None  # set when the text fusion is attached (phase 1 on)

    def log(self, message: str) -> None:
        if self.context.is_main:
            tqdm.write(message)


def train_one_epoch(setup: PhaseSetup, loader, run: Run, progress: PhaseProgress, bar, board: TensorBoardLog) -> dict:
    """One pass over ``loader``; ``progress.state`` advances in place. Returns the epoch's mean losses (over all of its
    steps, those before a resume included), the LR at its end and the speed of this pass."""
    phase = run.config.phase(setup.index)
    state, total_steps = progress.state, phase.epochs * len(loader.batch_sampler)
    device = run.context.device
    sums = {name: torch.tensor(value, device=device) for name, value in state.epoch_loss_sums.items()}
    seen, start, shown_loss = 0, time.perf_counter(), None
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        factor = lr_factor(
            state.step, total_steps, phase.warmup_iters, phase.scheduler, phase.flat_fraction, phase.min_lr_ratio
        )
        set_lr(setup.optimizer, factor)
        losses, taken = train_step(setup, images, targets, state.epoch)
        state.batch += 1  # the position in the epoch (what resuming skips), whether or not the step was taken
        bar.update(1)
        if not taken:
            state.nonfinite_in_a_row, state.nonfinite_total = state.nonfinite_in_a_row + 1, state.nonfinite_total + 1
            run.log(f"warning: non-finite loss, outputs or gradients at step {state.step}; step skipped")
            if state.nonfinite_in_a_row >= run.config.monitor.max_nonfinite_steps:
                raise TrainingError(
                    f"phase {setup.index}: {state.nonfinite_in_a_row} non-finite steps in a row at step {state.step} "
                    f"(monitor.max_nonfinite_steps); stopped, {kept_checkpoint(run, setup.index)} (lower the LR?)"
                )
            continue
        state.nonfinite_in_a_row, state.step, state.epoch_steps_taken = 0, state.step + 1, state.epoch_steps_taken + 1
        seen += len(images) * run.context.world_size
        for name, value in (("loss", sum(losses.values())), *losses.items()):
            sums[name] = sums.get(name, 0.0) + value.detach()  # stays on the device: no sync per term
        lr = head_lr(setup.optimizer)
        board.step(state.step, losses, lr)
        if state.epoch_steps_taken % 10 == 1:  # the mean loss costs a host sync: every 10 steps; the LR is free
            shown_loss = f"{float(sums['loss']) / state.epoch_steps_taken:.3f}"
        bar.set_postfix(loss=shown_loss, lr=f"{lr:.1e}", refresh=False)
        if phase.checkpoint_every_steps and state.step % phase.checkpoint_every_steps == 0:
            state.epoch_loss_sums = {name: float(value) for name, value in sums.items()}
            save(setup, run, progress, "last")
    seconds = time.perf_counter() - start
    means = {name: float(value) / max(1, state.epoch_steps_taken) for name, value in sums.items()}
    state.epoch_loss_sums, state.epoch_steps_taken = {}, 0
    lr = head_lr(setup.optimizer)
    return means | {"lr": lr, "images_per_s": seen / seconds, "seconds": seconds}


def head_lr(optimizer: torch.optim.Optimizer) -> float:
    """The phase's LR as it is now (the backbone's group, in phase 0, runs at a fraction of it)."""
    return max(group["lr"] for group in optimizer.param_groups)


def kept_checkpoint(run: Run, index: int) -> str:
    path = checkpoint_path(run.output_dir, index, "last")
    return f"the last good checkpoint {path} is kept" if path.is_file() else "no checkpoint of this phase was written"


def evaluate(model, run: Run, reliance: bool = False) -> dict:
    """COCO metrics on the validation set; with text, the added signal and (when asked) the text reliance."""

    def coco() -> dict:
        dataset, postprocessor = run.val_dataset, PostProcessor(len(run.info.class_names))
        return evaluate_detector(
            model,
            postprocessor,
            run.val_loader,
            run.context.device,
            dataset.category_ids,
            dataset.coco,
            progress=run.context.is_main,
        )[0]

    return evaluate_with_text(model, coco, reliance)


def format_evaluation(metrics: dict, per_class: bool) -> str:
    """``--eval-only``'s table: COCO's summary metrics, the per-class AP when asked, and the text figures."""
    lines = [format_table(metrics, per_class)]
    text = metrics["text"]
    if text:
        lines.append(
            "added signal per fusion level (fine → coarse): " + ", ".join(f"{r:.4f}" for r in text["added_signal"])
        )
    if "reliance" in text:
        reliance = text["reliance"]
        lines.append(
            f"AP(real) − AP(permuted) {signed(reliance['permuted'])}, AP(real) − AP(mean) {signed(reliance['mean'])}"
        )
    return "\n".join(lines)


def save(setup: PhaseSetup, run: Run, progress: PhaseProgress, kind: str, finished: bool = False) -> None:
    text = run.text.to_dict() if run.text is not None else None
    try:
        checkpoint = checkpoint_now(setup, run.info, progress, text, kind, finished)  # every rank checks
    except TrainingError as error:
        raise TrainingError(f"{error}; {kept_checkpoint(run, setup.index)} (lower the LR?)") from None
    if run.context.is_main:
        save_phase_checkpoint(checkpoint_path(run.output_dir, setup.index, kind), checkpoint)


def run_phase(index: int, model, constants: frozenset[int], start: StartPoint, run: Run) -> None:
    """One phase: freeze and set up, resume or measure the base, the epochs, the end-of-phase proofs and report."""
    phase, context = run.config.phase(index), run.context
    setup = setup_phase(
        index,
        model,
        constants,
        phase,
        run.variant,
        len(run.info.class_names),
        context.device,
        context.world_size,
        run.config.compile_frozen,
    )
    run.log(f"phase {index}: training {phase.trainable} ({setup.trainable_count():,} parameters), lr {setup.lr:g}")
    if start.resume is not None:
        progress = restore_phase(setup, start.resume)
    else:
        progress = PhaseProgress(TrainingState(), [*start.lineage, uuid.uuid4().hex[:8]], baseline=start.baseline)
    run.monitor.lineage = progress.lineage
    if PHASES[index].compares_to_base:
        val_fingerprint = file_sha256(run.val_dataset.annotation_file)
        baseline = run.monitor.adopt_baseline(
            progress.baseline, lambda: model.detector.state_dict(), val_fingerprint, lambda: evaluate(model, run), index
        )
        progress.baseline = baseline.to_dict()
        run.log(f"base detector: AP {baseline.AP:.4f}  AP50 {baseline.AP50:.4f} ({baseline.source})")
    dataset = loaders.build_train_dataset(
        run.config.data, run.variant, run.info.image_size, phase.augmentation, run.log
    )
    data = loaders.TrainingData(
        dataset,
        run.config.data,
        run.variant,
        run.info.image_size,
        phase.augmentation,
        run.info.seed,
        context.rank,
        context.world_size,
        pin_memory=context.device.type == "cuda",
    )
    steps = phase.epochs * data.batches_per_epoch
    if phase.warmup_iters >= steps:
        run.log(
            f"warning: phase{index}.warmup_iters {phase.warmup_iters} is not shorter than the phase ({steps} steps): "
            f"the LR never reaches phase{index}.lr {setup.lr:g}; lower warmup_iters or raise epochs"
        )
    done = progress.state.epoch * data.batches_per_epoch + progress.state.batch
    resumed_at = progress.state.step if start.resume is not None else None
    board = TensorBoardLog(
        run.output_dir,
        index,
        run.config.monitor.log_every_steps,
        resumed_at,
        run.config.monitor.tensorboard and context.is_main,
    )
    with tqdm(total=steps, initial=done, unit="step", disable=not context.is_main, dynamic_ncols=True) as bar:
        try:
            train_epochs(setup, run, data, progress, bar, board, fresh=start.resume is None)
        finally:
            board.close()
    checked = setup.policy.verify_frozen(setup.model)
    if not distributed.replicas_identical(setup.model, context.device):
        raise TrainingError(f"phase {index}: the {context.world_size} processes ended with different weights")
    replicas = f"; weights identical on {context.world_size} processes" if context.world_size > 1 else ""
    frozen = ", ".join(setup.frozen_parts()) or "constants"
    run.log(f"phase {index} done: frozen {frozen}: all {checked} tensors bit-identical{replicas}")
    save(setup, run, progress, "last", finished=True)
    run.monitor.write_report([f"Text embeddings: {run.text.source}."] if run.text is not None else [])


def train_epochs(
    setup: PhaseSetup,
    run: Run,
    data: loaders.TrainingData,
    progress: PhaseProgress,
    bar,
    board: TensorBoardLog,
    fresh: bool,
) -> None:
    """The phase's remaining epochs: train, evaluate, record, checkpoint (last; best when it improved), the guard."""
    index, phase, monitor = setup.index, run.config.phase(setup.index), run.monitor
    best_path = checkpoint_path(run.output_dir, index, "best")
    earlier_best = monitor.earlier_best(best_path) if fresh else None  # a file this run will replace
    for epoch in range(progress.state.epoch, phase.epochs):
        bar.set_description(f"phase {index} epoch {epoch + 1}/{phase.epochs}")
        started = time.perf_counter()
        setup.train_mode()
        stats = train_one_epoch(setup, data.loader(epoch, progress.state.batch), run, progress, bar, board)
        progress.state.epoch, progress.state.batch = epoch + 1, 0
        when = run.config.monitor.text_reliance
        metrics = evaluate(setup.eval_model, run, when == "every" or (when == "last" and epoch + 1 == phase.epochs))
        stats |= {"step": progress.state.step, "epoch_seconds": time.perf_counter() - started}  # with evaluation
        record = monitor.record(index, epoch + 1, metrics, stats)
        board.epoch(record)
        progress.history.append({"epoch": epoch + 1, "AP": metrics["AP"], "AP50": metrics["AP50"]})
        save(setup, run, progress, "last")
        score = metrics[run.config.monitor.best_metric]
        if progress.best_metric is None or score > progress.best_metric:
            if earlier_best is not None:
                verdict = "higher" if score > earlier_best else ("tied" if score == earlier_best else "LOWER")
                run.log(
                    f"{'note' if score > earlier_best else 'warning'}: {best_path} of an earlier run "
                    f"({run.config.monitor.best_metric} {earlier_best:.4f}) is replaced by this run's best so far "
                    f"({score:.4f}, {verdict})"
                )
            earlier_best, progress.best_metric = None, score
            save(setup, run, progress, "best")
        run.log(format_epoch(record, phase.epochs, progress.state.nonfinite_total))
        if index != run.phases[-1]:  # --phase all: the whole run's ETA (tqdm's covers this phase)
            run.log(run_time_left(run, index, epoch + 1, stats["epoch_seconds"]))
        if distributed.broadcast_object(run.context.is_main and monitor.exceeded(record)):
            run.log(f"warning: AP {metrics['AP']:.4f} is more than max_ap_drop {monitor.max_ap_drop} below the base")
            if run.config.monitor.on_drop == "stop":
                run.log(f"phase {index} stopped by the forgetting guard; {best_path} keeps the best weights")
                return


def run_time_left(run: Run, index: int, epochs_done: int, epoch_seconds: float) -> str:
    """The invocation's remaining time at this epoch's pace, evaluation included (every phase trains on the same
    images; phase 0, which trains the backbone, is the slowest, so the estimate errs long)."""
    later = [phase for phase in run.phases if phase > index]
    epochs_left = run.config.phase(index).epochs - epochs_done + sum(run.config.phase(phase).epochs for phase in later)
    minutes = epochs_left * epoch_seconds / 60
    epochs = f"{epochs_left} epoch{'s' if epochs_left != 1 else ''}"
    return f"run: about {minutes:.0f} min left ({epochs} of phases {index}–{run.phases[-1]} at this pace)"


def prepare_model(
    run: Run, model: MultimodalDetector, start: StartPoint, index: int, eval_only: bool, designs: FusionDesigns
) -> MultimodalDetector:
    """The phase's model with the start point's weights: the detector, then (phase ≥ 1) the text fusion."""
    detector = model.detector
    if start.class_names is not None and start.class_names != run.info.class_names:
        raise ConfigError(
            f"the start point's classes {start.class_names} differ from the dataset's "
            f"{run.info.class_names}; data.* must describe the classes the checkpoint was trained on"
        )
    if start.detector_state is not None:
        reset = load_detector_state(
            detector, start.detector_state, start.description, run.config.model.reinit_class_heads
        )
        trains_heads = {"class_heads", "decoder"} & set(run.config.phase(index).trainable)
        if reset and not trains_heads and not eval_only:
            raise ConfigError(
                f"model.reinit_class_heads gave the detector new, random class heads for {len(run.info.class_names)} "
                f"classes, but phase {index} trains only {run.config.phase(index).trainable}: they would stay random; "
                f"run phase 0 first, or add class_heads to phase{index}.trainable"
            )
        if reset:
            run.log(f"re-initialised for the new class count: {', '.join(reset)}")
    elif start.resume is None and run.config.model.pretrained_backbone and index == 0:
        detector.backbone.load_pretrained(run.config.model.pretrained_backbone)
    if PHASES[index].uses_text and run.text is None:
        text = None  # computed once, on rank 0, and sent to every rank
        if run.context.is_main or start.text_embeddings is not None:
            text = class_embeddings(run.config, run.info.class_names, start.text_embeddings, run.output_dir, run.log)
        run.text = TextEmbeddings.from_dict(distributed.broadcast_object(text.to_dict() if text else None))
        fusion = run.config.fusion
        model = attach_text(
            detector,
            run.text.embeddings,
            fusion.num_heads,
            fusion.text_aware_classification,
            level=designs.level,
            classifier=designs.classifier,
        )
    if start.fusion_state and model.uses_text:
        load_weights(model, None, start.fusion_state, start.description)
    return model.to(run.context.device)


def prepare_run(
    config: TrainConfig, output_dir: Path, context: distributed.DistributedContext, seed: int, phases: list[int]
) -> Run:
    """Seeds, the validation data (it fixes the class list) and the forgetting monitor."""
    random.seed(seed + context.rank)
    np.random.seed(seed + context.rank)
    torch.manual_seed(seed + context.rank)
    if context.is_main and loaders.prepare_synthetic_data(config.data):
        tqdm.write(f"generated the synthetic defect dataset in {config.data.synthetic_dir}")
    distributed.barrier()
    variant = get_variant(config.model.variant)
    image_size = config.model.image_size  # resolved by the config loader
    val_dataset = loaders.build_val_dataset(config.data, variant, image_size)
    val_loader = loaders.build_val_loader(
        val_dataset,
        config.data.val_batch_size,
        config.data.num_workers,
        context.rank,
        context.world_size,
        pin_memory=context.device.type == "cuda",
    )
    info = RunInfo(
        variant.name, image_size, val_dataset.class_names, val_dataset.category_ids, config_to_dict(config), seed
    )
    monitor = ForgettingMonitor(output_dir, config.monitor.max_ap_drop, writes=context.is_main)
    return Run(config, output_dir, context, info, variant, val_dataset, val_loader, monitor, phases)


def main(argv: list[str] | None = None, designs: FusionDesigns = FusionDesigns()) -> int:
    args, started = parse_args(argv), time.perf_counter()
    phase_now, output_dir = None, Path(args.output_dir or (Path(args.resume).parent if args.resume else "checkpoints"))
    try:
        # Config (a resumed run's own, with the keys --config and --set give), distributed context, output directory,
        # where the first phase starts, seeds, data.
        resume = (args.resume, read_phase_checkpoint(args.resume)) if args.resume else None
        config = resumed_config(*resume, args.config, args.set) if resume else load_config(args.config, args.set)
        if args.print_config:
            print(config_to_yaml(config), end="")
            return 0
        context = distributed.setup_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if config.data.batch_size % context.world_size:
            raise ConfigError(
                f"data.batch_size {config.data.batch_size} is the global batch and must divide evenly "
                f"over the {context.world_size} processes"
            )
        make_output_dir(output_dir, "--output-dir")
        stale = remove_stale_temporaries(output_dir) if context.is_main else []
        if stale:
            tqdm.write(f"removed the temporaries of writes a killed run left: {', '.join(path.name for path in stale)}")
        # --phase all runs phases 0 → 3, or from the phase of the --resume file on; a bare --resume, its phase.
        first = int(args.phase) if args.phase not in (None, "all") else (None if resume else 0)
        start = resolve_start(first, config, output_dir, resume, args.init, args.eval_only)
        first = start.resume.phase if first is None else first
        phases = [index for index in PHASE_INDICES if index >= first] if args.phase == "all" else [first]
        seed, changes = check_resumable(start, config, phases[0], args.seed) if start.resume else (args.seed or 0, [])
        run = prepare_run(config, output_dir, context, seed, phases)
        for change in changes:
            run.log(f"resume with a changed config: {change}")
        run.log(f"config, values set by the YAML and --set (--print-config shows every key): {changed_values(config)}")

        # Model: the DEIMv2 detector; phases ≥ 1 wrap it with the text fusion. Then the phases, in order.
        detector = build_detector(run.variant.name, len(run.info.class_names), eval_size=(run.info.image_size,) * 2)
        if context.world_size > 1 and context.device.type == "cuda":
            # As official DEIMv2 (sync_bn): batch statistics over all GPUs when BatchNorm trains (phase 0).
            detector = torch.nn.SyncBatchNorm.convert_sync_batchnorm(detector)
        constants, model = constant_parameters(detector), MultimodalDetector(detector)
        for position, phase_now in enumerate(phases):
            start = start if position == 0 else resolve_start(phase_now, config, output_dir)
            for note in start.notes:
                run.log(note)
            run.log(f"phase {phase_now}: starting from {start.description}")
            model = prepare_model(run, model, start, phase_now, args.eval_only, designs)
            if args.eval_only:
                weights = "EMA weights of the resume point, as its run evaluated them" if start.resume else "weights"
                run.log(f"evaluating the start {weights}")
                metrics = evaluate(model, run, reliance=args.text_reliance and model.uses_text)
                run.log(format_evaluation(metrics, args.per_class))
                run.log(f"metrics: {json.dumps(metrics)}")
                return 0
            run_phase(phase_now, model, constants, start, run)
        run.log("\n" + run.monitor.summary_table())
        run.monitor.write_summary(machine(context.device), time.perf_counter() - started, sys.argv)
        run.log(run.monitor.text_verdict())
        return 0
    except UserError as error:
        return report(error)
    except KeyboardInterrupt:
        last = checkpoint_path(output_dir, phase_now, "last") if phase_now is not None else None
        hint = ""
        if last is not None and last.is_file():
            command = ["python", "train_progressive.py", "--resume", str(last)]
            command += ["--phase", "all"] if args.phase == "all" else []
            command += ["--device", args.device] if args.device else []
            hint = f"; continue with: {shlex.join(command)}"
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
