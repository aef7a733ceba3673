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

from deim_lib.cli import make_output_dir, report
from deim_lib.data.dataset import CocoDetection
from deim_lib.errors import UserError
from deim_lib.variants import Variant, get_variant
from multimodal.config import ConfigError, TrainConfig, changed_values, config_to_dict, config_to_yaml, load_config
from multimodal.data import loaders
from multimodal.files import remove_stale_temporaries
from multimodal.model.assemble import FusionDesigns, ModelSpec, Weights, assemble_model
from multimodal.model.text_encoder import TextEmbeddings, class_embeddings
from multimodal.model.text_usage import evaluate_model
from multimodal.train import distributed
from multimodal.train.checkpoint import PhaseProgress, RunInfo, checkpoint_path
from multimodal.train.guard import ForgettingGuard
from multimodal.train.optimization import lr_factor, set_lr
from multimodal.train.records import Baseline, MetricsLog, epoch_record
from multimodal.train.report import format_epoch, format_evaluation, write_report, write_summary
from multimodal.train.start import StartPoint, open_resume, resolve_start
from multimodal.train.step import Phase, TrainingError, build_phase, restore_phase, save_checkpoint, train_step
from multimodal.train.tensorboard_log import TensorBoardLog


@dataclass(frozen=True)
class Run:
    """What every phase of one invocation shares (built once in ``main``, never changed)."""

    config: TrainConfig
    output_dir: Path
    context: distributed.DistributedContext
    info: RunInfo
    variant: Variant
    val_dataset: CocoDetection
    val_loader: torch.utils.data.DataLoader
    guard: ForgettingGuard
    metrics_log: MetricsLog
    phases: list[int]  # the phases this invocation runs, in order
    designs: FusionDesigns

    def log(self, message: str) -> None:
        if self.context.is_main:
            tqdm.write(message)


def train_one_epoch(
    phase: Phase, loader, progress: PhaseProgress, run: Run, bar, board: TensorBoardLog, save_last
) -> dict:
    """One pass over ``loader``; ``progress.state`` advances in place. Returns the epoch's mean losses (over all of its
    steps, those before a resume included), the LR at its end and the speed of this pass."""
    state = progress.state
    total_steps, device = phase.config.epochs * len(loader.batch_sampler), run.context.device
    sums = {name: torch.tensor(value, device=device) for name, value in state.epoch_loss_sums.items()}
    seen, start, shown_loss = 0, time.perf_counter(), None
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        config = phase.config
        set_lr(
            phase.optimizer,
            lr_factor(
                state.step,
                total_steps,
                config.warmup_iters,
                config.scheduler,
                config.flat_fraction,
                config.min_lr_ratio,
            ),
        )
        # Forward, loss, backward and the optimiser (and EMA) step, or no step at all when anything is not finite.
        losses, taken = train_step(phase, images, targets, state.epoch)
        state.batch += 1  # the position in the epoch (what resuming skips), whether or not the step was taken
        bar.update(1)
        if not taken:
            state.nonfinite_in_a_row, state.nonfinite_total = state.nonfinite_in_a_row + 1, state.nonfinite_total + 1
            run.log(f"warning: non-finite loss, outputs or gradients at step {state.step}; step skipped")
            if state.nonfinite_in_a_row >= run.config.monitor.max_nonfinite_steps:
                raise TrainingError(
                    f"phase {phase.index}: {state.nonfinite_in_a_row} non-finite steps in a row at step {state.step} "
                    f"(monitor.max_nonfinite_steps); stopped, {kept_checkpoint(run, phase.index)} (lower the LR?)"
                )
            continue
        state.nonfinite_in_a_row, state.step, state.epoch_steps_taken = 0, state.step + 1, state.epoch_steps_taken + 1
        seen += len(images) * run.context.world_size
        for name, value in (("loss", sum(losses.values())), *losses.items()):
            sums[name] = sums.get(name, 0.0) + value.detach()  # stays on the device: no sync per term
        lr = head_lr(phase.optimizer)
        board.step(state.step, losses, lr)
        if state.epoch_steps_taken % 10 == 1:  # the mean loss costs a host sync: every 10 steps; the LR is free
            shown_loss = f"{float(sums['loss']) / state.epoch_steps_taken:.3f}"
        bar.set_postfix(loss=shown_loss, lr=f"{lr:.1e}", refresh=False)
        if config.checkpoint_every_steps and state.step % config.checkpoint_every_steps == 0:
            state.epoch_loss_sums = {name: float(value) for name, value in sums.items()}
            save_last()
    seconds = time.perf_counter() - start
    means = {name: float(value) / max(1, state.epoch_steps_taken) for name, value in sums.items()}
    state.epoch_loss_sums, state.epoch_steps_taken = {}, 0
    return means | {"lr": head_lr(phase.optimizer), "images_per_s": seen / seconds, "seconds": seconds}


def head_lr(optimizer: torch.optim.Optimizer) -> float:
    """The phase's LR as it is now (the backbone's group, in phase 0, runs at a fraction of it)."""
    return max(group["lr"] for group in optimizer.param_groups)


def kept_checkpoint(run: Run, index: int) -> str:
    path = checkpoint_path(run.output_dir, index, "last")
    return f"the last good checkpoint {path} is kept" if path.is_file() else "no checkpoint of this phase was written"


def evaluate(model, run: Run, reliance: bool = False) -> dict:
    """COCO metrics on the validation set; with text, the added signal and (when asked) the text reliance."""
    return evaluate_model(model, run.val_dataset, run.val_loader, run.context.device, reliance, run.context.is_main)


def save(phase: Phase, run: Run, progress: PhaseProgress, text: TextEmbeddings | None, kind: str, finished=False):
    path = checkpoint_path(run.output_dir, phase.index, kind)
    try:
        save_checkpoint(phase, run.info, progress, text and text.to_dict(), path, kind, finished, run.context.is_main)
    except TrainingError as error:
        raise TrainingError(f"{error}; {kept_checkpoint(run, phase.index)} (lower the LR?)") from None


def run_phase(
    index: int, model, constants: frozenset[int], start: StartPoint, text: TextEmbeddings | None, run: Run
) -> tuple[list[str], Baseline | None]:
    """One phase: freeze and set up, resume or measure the base, the epochs, the end-of-phase proofs and report.
    Returns the phase's lineage and baseline, which the run's summary reports."""
    context = run.context
    phase = build_phase(
        index=index,
        config=run.config.phase(index),
        model=model,
        constants=constants,
        variant=run.variant,
        num_classes=len(run.info.class_names),
        device=context.device,
        world_size=context.world_size,
        compile_frozen=run.config.compile_frozen,
    )
    run.log(
        f"phase {index}: training {phase.config.trainable} ({phase.trainable_count():,} parameters), lr {phase.lr:g}"
    )
    if start.resume is not None:
        progress = restore_phase(phase, start.resume)
    else:
        progress = PhaseProgress.new([*start.lineage, uuid.uuid4().hex[:8]], start.baseline)
    baseline = None  # phase 0 trains the base: nothing to compare with
    if phase.rule.compares_to_base:
        annotations = run.val_dataset.annotation_file
        baseline = run.guard.adopt_baseline(
            progress.baseline, lambda: model.detector.state_dict(), annotations, lambda: evaluate(model, run), index
        )
        progress.baseline = baseline.to_dict()
        run.log(f"base detector: AP {baseline.AP:.4f}  AP50 {baseline.AP50:.4f} ({baseline.source})")
    dataset = loaders.build_train_dataset(
        run.config.data, run.variant, run.info.image_size, phase.config.augmentation, run.log
    )
    data = loaders.TrainingData(
        dataset=dataset,
        data=run.config.data,
        variant=run.variant,
        image_size=run.info.image_size,
        augmentation=phase.config.augmentation,
        seed=run.info.seed,
        rank=context.rank,
        world_size=context.world_size,
        pin_memory=context.device.type == "cuda",
    )
    steps = phase.config.epochs * data.batches_per_epoch
    if phase.config.warmup_iters >= steps:
        run.log(
            f"warning: phase{index}.warmup_iters {phase.config.warmup_iters} is not shorter than the phase ({steps} "
            f"steps): the LR never reaches phase{index}.lr {phase.lr:g}; lower warmup_iters or raise epochs"
        )
    done = progress.state.epoch * data.batches_per_epoch + progress.state.batch
    board = TensorBoardLog(
        run.output_dir,
        index,
        run.config.monitor.log_every_steps,
        resumed_at_step=progress.state.step if start.resume is not None else None,
        enabled=run.config.monitor.tensorboard and context.is_main,
    )
    with tqdm(total=steps, initial=done, unit="step", disable=not context.is_main, dynamic_ncols=True) as bar:
        try:
            train_epochs(phase, progress, baseline, text, data, run, bar, board, fresh=start.resume is None)
        finally:
            board.close()
    checked = phase.policy.verify_frozen(phase.model)
    if not distributed.replicas_identical(phase.model, context.device):
        raise TrainingError(f"phase {index}: the {context.world_size} processes ended with different weights")
    replicas = f"; weights identical on {context.world_size} processes" if context.world_size > 1 else ""
    frozen = ", ".join(phase.frozen_parts()) or "constants"
    run.log(f"phase {index} done: frozen {frozen}: all {checked} tensors bit-identical{replicas}")
    save(phase, run, progress, text, "last", finished=True)
    if context.is_main:
        notes = [f"Text embeddings: {text.source}."] if text is not None else []
        records = run.metrics_log.records(progress.lineage)
        write_report(run.output_dir, records, baseline, progress.run_id, run.guard.max_ap_drop, notes)
    return progress.lineage, baseline


def train_epochs(
    phase: Phase,
    progress: PhaseProgress,
    baseline: Baseline | None,
    text: TextEmbeddings | None,
    data: loaders.TrainingData,
    run: Run,
    bar,
    board: TensorBoardLog,
    fresh: bool,
) -> None:
    """The phase's remaining epochs: train, evaluate, record, checkpoint (last; best when it improved), the guard."""
    index, epochs, guard, state = phase.index, phase.config.epochs, run.guard, progress.state
    best_path = checkpoint_path(run.output_dir, index, "best")
    earlier_best = guard.earlier_best(best_path, progress.lineage) if fresh else None  # a file this run will replace
    for epoch in range(state.epoch, epochs):
        bar.set_description(f"phase {index} epoch {epoch + 1}/{epochs}")
        started = time.perf_counter()
        phase.train_mode()
        loader = data.loader(epoch, state.batch)
        stats = train_one_epoch(
            phase, loader, progress, run, bar, board, lambda: save(phase, run, progress, text, "last")
        )
        state.epoch, state.batch = epoch + 1, 0
        when = run.config.monitor.text_reliance
        metrics = evaluate(phase.eval_model, run, when == "every" or (when == "last" and epoch + 1 == epochs))
        stats |= {"step": state.step, "epoch_seconds": time.perf_counter() - started}  # with evaluation
        record = epoch_record(progress.run_id, index, epoch + 1, metrics, stats, baseline)
        run.metrics_log.append(record)
        board.epoch(record)
        progress.history.append({"epoch": epoch + 1, "AP": metrics["AP"], "AP50": metrics["AP50"]})
        save(phase, run, progress, text, "last")
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
            save(phase, run, progress, text, "best")
        run.log(format_epoch(record, epochs, state.nonfinite_total))
        if index != run.phases[-1]:  # --phase all: the whole run's ETA (tqdm's covers this phase)
            run.log(run_time_left(run, index, epoch + 1, stats["epoch_seconds"]))
        if distributed.broadcast_object(run.context.is_main and guard.exceeded(record)):
            run.log(f"warning: AP {metrics['AP']:.4f} is more than max_ap_drop {guard.max_ap_drop} below the base")
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


def phase_text(run: Run, start: StartPoint, index: int) -> TextEmbeddings | None:
    """The class embeddings of a phase with text: carried by the start point, else computed once on rank 0 and sent
    to every rank; None for phase 0."""
    if not PHASES[index].uses_text:
        return None
    text = None
    if run.context.is_main or start.text_embeddings is not None:
        text = class_embeddings(run.config, run.info.class_names, start.text_embeddings, run.output_dir, run.log)
    return TextEmbeddings.from_dict(distributed.broadcast_object(text.to_dict() if text else None))


def phase_model(run: Run, start: StartPoint, index: int, text: TextEmbeddings | None, eval_only: bool):
    """The phase's model, assembled from the start point's weights (``model.assemble``), on the run's device, and the
    ids of its parameters built non-trainable."""
    model_config = run.config.model
    spec = ModelSpec(
        variant=run.variant,
        class_names=run.info.class_names,
        image_size=run.info.image_size,
        text=text,
        fusion=run.config.fusion,
        designs=run.designs,
        class_scores=model_config.class_scores,
        text_map_rank=model_config.text_map_rank,
        new_classes=model_config.new_classes,
        # As official DEIMv2 (sync_bn): batch statistics over all GPUs when BatchNorm trains (phase 0).
        sync_batchnorm=run.context.world_size > 1 and run.context.device.type == "cuda",
    )
    weights = Weights(
        source=start.description,
        detector=start.detector_state,
        fusion=start.fusion_state,
        class_names=start.class_names,
        reinit_class_heads=model_config.reinit_class_heads,
        backbone=model_config.pretrained_backbone if start.resume is None and index == 0 else None,
    )
    assembled = assemble_model(spec, weights)
    trainable = run.config.phase(index).trainable
    if assembled.reinitialised and not {"class_heads", "decoder"} & set(trainable) and not eval_only:
        raise ConfigError(
            f"model.reinit_class_heads gave the detector new, random class heads for {len(run.info.class_names)} "
            f"classes, but phase {index} trains only {trainable}: they would stay random; run phase 0 first, or add "
            f"class_heads to phase{index}.trainable"
        )
    if assembled.reinitialised:
        run.log(f"re-initialised for the new class count: {', '.join(assembled.reinitialised)}")
    for note in assembled.notes:
        run.log(f"note: {note}")
    if assembled.added:
        how = "scored from their descriptions" if model_config.new_classes == "text" else "given fresh random rows"
        run.log(f"added {len(assembled.added)} classes the weights lack, {how}: {', '.join(assembled.added)}")
    return assembled.model.to(run.context.device), assembled.constants


def prepare_run(
    config: TrainConfig,
    output_dir: Path,
    context: distributed.DistributedContext,
    seed: int,
    phases: list[int],
    designs: FusionDesigns,
) -> Run:
    """Seeds, the validation data (it fixes the class list), the forgetting guard and the metrics log."""
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
    guard = ForgettingGuard(output_dir, config.monitor.max_ap_drop, writes=context.is_main)
    metrics_log = MetricsLog(output_dir / "metrics.jsonl", writes=context.is_main)
    return Run(config, output_dir, context, info, variant, val_dataset, val_loader, guard, metrics_log, phases, designs)


def main(argv: list[str] | None = None, designs: FusionDesigns | None = None) -> int:
    """The command line; ``designs`` replaces the fusion designs phase 1 builds (experiments/fusion_designs.py)."""
    args, started = parse_args(argv), time.perf_counter()
    phase_now, output_dir = None, Path(args.output_dir or (Path(args.resume).parent if args.resume else "checkpoints"))
    try:
        # Config, seed and the first phase's start point: a resume takes all three from its file (the keys --config
        # and --set give override its config); otherwise the YAML and --set, --seed, and --init or the defaults.
        first = int(args.phase) if args.phase not in (None, "all") else None
        resume = None
        if args.resume:
            resume = open_resume(args.resume, args.config, args.set, first, args.eval_only, args.seed, args.init)
            config = resume.config
        else:
            config = load_config(args.config, args.set)
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
        if resume is not None:
            start, first, seed = resume.start, resume.start.resume.phase, resume.seed
        else:
            first = 0 if first is None else first
            start, seed = resolve_start(first, config, output_dir, args.init, args.eval_only), args.seed or 0
        # --phase all runs phases 0 → 3, or from the phase of the --resume file on; a bare --resume, its phase.
        phases = [index for index in PHASE_INDICES if index >= first] if args.phase == "all" else [first]
        run = prepare_run(config, output_dir, context, seed, phases, designs or FusionDesigns())
        for change in resume.changes if resume else []:
            run.log(f"resume with a changed config: {change}")
        run.log(f"config, values set by the YAML and --set (--print-config shows every key): {changed_values(config)}")

        # The phases, in order, each with the model assembled from its start point: the DEIMv2 detector, wrapped
        # from phase 1 on with the text fusion.
        for position, phase_now in enumerate(phases):
            start = start if position == 0 else resolve_start(phase_now, config, output_dir)
            for note in start.notes:
                run.log(note)
            run.log(f"phase {phase_now}: starting from {start.description}")
            text = phase_text(run, start, phase_now)
            model, constants = phase_model(run, start, phase_now, text, args.eval_only)
            if args.eval_only:
                weights = "EMA weights of the resume point, as its run evaluated them" if start.resume else "weights"
                run.log(f"evaluating the start {weights}")
                metrics = evaluate(model, run, reliance=args.text_reliance and model.uses_text)
                run.log(format_evaluation(metrics, args.per_class))
                run.log(f"metrics: {json.dumps(metrics)}")
                return 0
            lineage, baseline = run_phase(phase_now, model, constants, start, text, run)
        if context.is_main:
            records, seconds = run.metrics_log.records(lineage), time.perf_counter() - started
            run.log("\n" + write_summary(output_dir, records, baseline, lineage, context.device, seconds, sys.argv))
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
