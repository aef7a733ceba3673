"""The evidence for a technical report in one command: progressive fine-tuning of your converged DEIMv2 against
joint fine-tuning, its controls and WiSE-FT, over seeds, then one table, one figure and a conclusion from the numbers.

    python experiments/evidence.py --config my.yaml --init my_detector.pth --seeds 0 1 --output runs/evidence \\
        [--runs progressive joint_2e-4 ...] [--phases 1 2 3] [--budget 0.5] [--set KEY=VALUE ...] [--device cuda]

Every run of every seed is a folder ``<output>/<run>_s<seed>``; each of its phases is one process of
``train_progressive.py`` (its output in ``phaseN.log``), so that a crash, a kill or Ctrl-C ends one phase and
leaves the training script's own files, which it writes atomically. ``phaseN.done`` is written only after that
process exited with 0. Run the same command again and it continues: finished phases are reused, an unfinished one
resumes from its ``phaseN_last.pth``. Two copies of the command may share a grid (``phaseN.lock``, a folder: mkdir is
atomic): a copy skips what the other is running and what depends on it, and a last invocation fills in and writes
the report. A lock whose process has died on this machine is taken over.

Budgets come from the config: the progressive run trains ``phaseN.epochs`` of each phase of ``--phases``, every
one-phase run their sum (times ``--budget``). Written to ``<output>``: ``evidence.md`` (conclusion, table over seeds,
WiSE-FT, per-class ΔAP), ``evidence.json`` (every figure) and ``evidence_ap.png`` (AP per step, mean and min–max over
seeds, phases marked).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from deim_lib.cli import HelpFormatter, make_output_dir, report
from deim_lib.errors import UserError
from experiments import compare_runs, held_out_classes
from multimodal.config import TrainConfig, load_config
from multimodal.files import atomic_write, atomic_write_text, process_alive
from multimodal.train.checkpoint import checkpoint_path, read_phase_checkpoint

PROJECT_DIR = Path(__file__).resolve().parents[1]
JOINT = "phase1.trainable=[fusion, encoder, decoder]"
WISE_FT_WEIGHTS = ["0", "0.2", "0.4", "0.6", "0.8", "1"]
# Every run and what it controls for, in the order the grid runs them (wise_ft mixes joint_2e-4's end point).
RUNS = {
    "progressive": "the phases of --phases (1 → 2 → 3), as the config sets them: the package's recipe",
    "joint_2e-4": "fusion + encoder + decoder at once at 2e-4 (the phase-1 LR), the same epochs in all",
    "joint_2e-5": "the same at 2e-5 (the phase-3 LR)",
    "batchnorm_drift": "the same at lr 0: no weight changes, BatchNorm statistics alone",
    "class_heads_only": "the class heads alone at the phase-2 LR, the fusion untrained: the linear probe",
    "progressive_random_text": "progressive with random unit class embeddings: is the text more than a code per class?",
    "progressive_permuted_text": "progressive with the real text rows permuted among the classes: the text's meaning",
    "wise_ft": "joint_2e-4's end point mixed with the base (multimodal.tools.interpolate)",
    "held_out_classes": "each class (--held-out-count classes) left out of the base in turn and added back by its "
    "description, no training: against random and permuted text, fresh rows and the base's own rows (once, no seed)",
    "fusion_only": "phase 1 alone for all the epochs (not in the default grid)",
    "joint_backbone_2e-5": "joint with the backbone too, at 2e-5 (not in the default grid)",
}
DEFAULT_RUNS = list(RUNS)[:9]
ONE_PHASE_SETTINGS = {
    "joint_2e-4": [JOINT, "phase1.lr=2e-4"],
    "joint_2e-5": [JOINT, "phase1.lr=2e-5"],
    "batchnorm_drift": [JOINT, "phase1.lr=0"],
    "fusion_only": [],
    "joint_backbone_2e-5": [
        "phase1.trainable=[fusion, backbone, encoder, decoder]",
        "phase1.lr=2e-5",
        "allow_backbone_training=true",
    ],
}
TEXT_RUNS = {"progressive_random_text": "random_text.npy", "progressive_permuted_text": "permuted_text.npy"}


class EvidenceError(UserError):
    """A bad flag or a failed phase; the message names it and the fix."""


@dataclass(frozen=True)
class Step:
    """One process of the grid: a phase of a run, or the WiSE-FT interpolation."""

    run: str
    seed: int
    directory: Path  # <output>/<run>_s<seed>
    name: str  # "phase1", "phase2", … or "wise_ft": names its marker, lock and log
    arguments: list[str]  # after the interpreter
    epochs: int  # its share of the work, for the ETA (WiSE-FT's six evaluations count as one epoch)
    requires: Path | None = None  # the marker of the step it starts from
    resume_arguments: list[str] | None = None  # a phase: how to continue its unfinished phaseN_last.pth

    @property
    def marker(self) -> Path:
        return self.directory / f"{self.name}.done"

    @property
    def label(self) -> str:
        return f"{self.directory.name} {self.name}"


def phase_budgets(config: TrainConfig, phases: list[int], budget: float) -> dict[int, int]:
    """Epochs of each progressive phase: the config's ``phaseN.epochs`` times ``budget``, at least 1."""
    return {phase: max(1, round(config.phase(phase).epochs * budget)) for phase in phases}


@dataclass(frozen=True)
class Grid:
    """What every run of the grid shares (from the command line and the config)."""

    config: Path
    init: Path
    output: Path
    overrides: list[str]  # --set, given to every phase before the run's own
    device: list[str]  # ["--device", D] or []
    budgets: dict[int, int]  # progressive phase → epochs
    class_head_lr: float | None  # the LR the recipe trains the class heads at (phase 2's)
    text_files: dict[str, Path]  # text-control run → its class embeddings
    held_out_count: int  # classes left out in each split of held_out_classes


def run_steps(run: str, seed: int, grid: Grid) -> list[Step]:
    """The processes of one run and seed, in order."""
    directory, device, budgets = grid.output / f"{run}_s{seed}", grid.device, grid.budgets
    if run == "held_out_classes":
        directory = grid.output / run
        arguments = [str(PROJECT_DIR / "experiments" / "held_out_classes.py"), "--config", str(grid.config)]
        arguments += ["--init", str(grid.init), "--output", str(directory), "--count", str(grid.held_out_count)]
        arguments += [*device, *(f"--set={value}" for value in grid.overrides)]
        return [Step(run, seed, directory, "held_out", arguments, 1)]
    if run == "wise_ft":
        joint = grid.output / f"joint_2e-4_s{seed}"
        arguments = ["-m", "multimodal.tools.interpolate", "--base", str(grid.init), "--output", str(directory)]
        arguments += ["--finetuned", str(checkpoint_path(joint, 1, "last")), "--weights", *WISE_FT_WEIGHTS, *device]
        return [Step(run, seed, directory, "wise_ft", arguments, 1, requires=joint / "phase1.done")]
    total = sum(budgets.values())
    if run.startswith("progressive"):
        text = [f"text_encoder.precomputed={grid.text_files[run]}"] if run in TEXT_RUNS else []
        settings = {phase: (epochs, text) for phase, epochs in budgets.items()}
    elif run == "class_heads_only":
        settings = {1: (total, ["phase1.trainable=[class_heads]", f"phase1.lr={json.dumps(grid.class_head_lr)}"])}
    else:
        settings = {1: (total, ONE_PHASE_SETTINGS[run])}
    steps = []
    for phase, (epochs, overrides) in settings.items():
        script = str(PROJECT_DIR / "train_progressive.py")
        arguments = [script, "--config", str(grid.config), "--phase", str(phase), "--seed", str(seed)]
        arguments += ["--output-dir", str(directory), *device]
        arguments += ["--init", str(grid.init)] if phase == 1 else []  # later phases start from the phase before
        arguments += [f"--set={value}" for value in [*grid.overrides, f"phase{phase}.epochs={epochs}", *overrides]]
        resume = [script, "--resume", str(checkpoint_path(directory, phase, "last")), *device]
        requires = directory / f"phase{phase - 1}.done" if phase > 1 else None
        steps.append(Step(run, seed, directory, f"phase{phase}", arguments, epochs, requires, resume))
    return steps


def write_text_controls(config: TrainConfig, output: Path, runs: list[str]) -> tuple[dict[str, Path], list[str]]:
    """The class embeddings of the text-control runs, written once into ``<output>/text`` (seeded: every copy of the
    command writes the same rows). Returns the files by run, and notes on runs that cannot be made."""
    wanted = [run for run in runs if run in TEXT_RUNS]
    files = {run: output / "text" / TEXT_RUNS[run] for run in wanted}
    if all(path.is_file() for path in files.values()):
        return files, []
    # The real rows: the config's text model (cached) or its text_encoder.precomputed file.
    cache = Path(config.text_encoder.cache_dir) if config.text_encoder.cache_dir else output / "text_cache"
    rows = held_out_classes.class_texts(config, cache)
    rng = np.random.default_rng(0)
    random_rows = rng.standard_normal(rows.shape)
    # A random cycle over the classes: every class takes the next one's row, so none keeps its own.
    order = rng.permutation(len(rows))
    permuted = rows.copy()
    permuted[order] = rows[np.roll(order, -1)]
    arrays = {
        "progressive_random_text": random_rows / np.linalg.norm(random_rows, axis=1, keepdims=True),
        "progressive_permuted_text": permuted,
    }
    notes = []
    if len(rows) < 2 and files.pop("progressive_permuted_text", None):
        notes.append("progressive_permuted_text skipped: with one class there is no other class's text to give it")
    (output / "text").mkdir(parents=True, exist_ok=True)
    for run, path in files.items():
        atomic_write(path, lambda file, run=run: np.save(file, arrays[run].astype(np.float32)))
    return files, notes


def grid_steps(runs: list[str], seeds: list[int], grid: Grid) -> list[Step]:
    """Every process of the grid in order: the held-out-class test once (it trains nothing, so has no seed), then
    each run for each seed."""
    steps = run_steps("held_out_classes", seeds[0], grid) if "held_out_classes" in runs else []
    trained = [run for run in runs if run != "held_out_classes"]
    return steps + [step for seed in seeds for run in trained for step in run_steps(run, seed, grid)]


def take_lock(lock: Path) -> bool:
    """Whether this process now holds ``lock`` (a folder naming its owner). A lock whose owner died on this machine
    is taken over; one held by a live process, or by another machine, or without an owner yet, is not."""
    try:
        lock.mkdir()
    except FileExistsError:
        try:
            host, pid = (lock / "owner").read_text().split()
        except (OSError, ValueError):
            return False  # its owner is between mkdir and writing its name, or it predates owner files
        if host != socket.gethostname() or process_alive(int(pid)):
            return False
        # Renaming is atomic: of two copies finding the same dead lock, one takes it over.
        try:
            lock.rename(lock.with_name(f"{lock.name}.dead-{os.getpid()}"))
        except OSError:
            return False
        shutil.rmtree(lock.with_name(f"{lock.name}.dead-{os.getpid()}"))
        return take_lock(lock)
    (lock / "owner").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return True


def step_arguments(step: Step) -> list[str]:
    """The step's command, or the resume of its unfinished ``phaseN_last.pth``. A finished one without the marker (the
    process was killed after its last epoch, while writing its report) is run again from the start."""
    last = step.directory / f"{step.name}_last.pth"
    if step.resume_arguments and last.is_file() and not read_phase_checkpoint(last).finished:
        return step.resume_arguments
    return step.arguments


class GridProgress:
    """One line over the whole grid: phases and runs done (by any copy: the markers say), time elapsed, and the ETA
    from this invocation's mean time per epoch of the phases it finished."""

    def __init__(self, steps: list[Step]):
        self.steps, self.started, self.seconds, self.epochs = steps, time.monotonic(), 0.0, 0

    def finished(self, step: Step, seconds: float) -> None:
        self.seconds, self.epochs = self.seconds + seconds, self.epochs + step.epochs

    def line(self, doing: str) -> str:
        left = [step for step in self.steps if not step.marker.is_file()]
        runs = {(step.run, step.seed) for step in self.steps}
        runs_left = {(step.run, step.seed) for step in left}
        if self.epochs:
            eta = f"ETA {sum(step.epochs for step in left) * self.seconds / self.epochs / 60:.0f} min"
        else:
            eta = "ETA after the first phase"
        return (
            f"grid: {len(self.steps) - len(left)}/{len(self.steps)} phases, {len(runs) - len(runs_left)}/{len(runs)} "
            f"runs done, {(time.monotonic() - self.started) / 60:.0f} min elapsed, {eta}; {doing}"
        )


def run_grid(steps: list[Step], python: str) -> list[str]:
    """Every step not done yet, in order; returns notes on the steps left to another copy of the command."""
    progress, notes = GridProgress(steps), []
    environment = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_DIR), os.getenv("PYTHONPATH")]))
    }
    for step in steps:
        if step.marker.is_file():
            continue  # finished before: reused
        if step.requires is not None and not step.requires.is_file():
            notes.append(
                f"{step.label} waits for {step.requires.parent.name} {step.requires.stem} (another copy runs it)"
            )
            continue
        step.directory.mkdir(parents=True, exist_ok=True)
        lock = step.directory / f"{step.name}.lock"
        if not take_lock(lock):
            notes.append(f"{step.label}: another copy of the command runs it (else remove {lock})")
            continue
        try:
            arguments = step_arguments(step)
            log = step.directory / f"{step.name}.log"
            how = "resuming" if arguments is step.resume_arguments else "running"
            print(progress.line(f"{how} {step.label} (log: {log})"), flush=True)
            started = time.monotonic()
            with log.open("a") as output:
                code = subprocess.run(
                    [python, *arguments], stdout=output, stderr=subprocess.STDOUT, env=environment
                ).returncode
            if code != 0:
                raise EvidenceError(
                    f"{step.label} failed (exit code {code}): {last_error(log)}; see {log}, then run the command again"
                )
            step.marker.touch()
            progress.finished(step, time.monotonic() - started)
        finally:
            shutil.rmtree(lock, ignore_errors=True)
    print(progress.line("every phase this copy could run is done"), flush=True)
    return notes


def last_error(log: Path) -> str:
    """The ``error:`` line of a failed phase's log (its last line when it has none)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


# The questions the conclusion answers, each by comparing progressive's final AP with another run's.
QUESTIONS = {
    "base": "Kept what the detector knew?",
    "joint_2e-4": "Better than unfreezing the encoder and decoder at once at the phase-1 LR?",
    "joint_2e-5": "Better than unfreezing them at once at the phase-3 LR?",
    "progressive_random_text": "Is the text more than a distinct vector per class (random unit text)?",
    "progressive_permuted_text": "Does the text's meaning matter (every class given another class's text)?",
}


def compare(subject: str, other: str, subject_values: list[float], other_values: list[float]) -> tuple[str, str]:
    """``subject`` against ``other`` on their values over seeds: "win" or "loss" when the difference of the means
    exceeds the seed spread (the larger of the two standard deviations), else "tie"; "unjudged" with one seed each.
    Returns the verdict and the sentence saying it, a negative result as plainly as a positive one."""
    mine, theirs = statistics.fmean(subject_values), statistics.fmean(other_values)
    difference = mine - theirs
    if difference == 0:
        head = f"{subject} ends level with {other} ({mine:.4f} both)"
    else:
        head = f"{subject} ends {abs(difference):.4f} {'above' if difference > 0 else 'below'} {other} "
        head += f"({mine:.4f} vs {theirs:.4f})"
    spreads = [statistics.stdev(values) for values in (subject_values, other_values) if len(values) > 1]
    if not spreads:
        return "unjudged", f"{head}; with one seed there is no spread to judge the difference by: run two or more."
    spread = max(spreads)
    if abs(difference) <= spread:
        return "tie", f"{head}; the difference is within the seed spread (±{spread:.4f}): no difference shown."
    verdict, word = ("win", "better") if difference > 0 else ("loss", "worse")
    return verdict, f"{head}; the difference exceeds the seed spread (±{spread:.4f}): {subject} is {word}."


def meaning_note(config: TrainConfig) -> str:
    if config.model.class_scores == "text" or config.fusion.text_aware_classification:
        return (
            "The class scores depend on which text belongs to which class here (model.class_scores: text or "
            "fusion.text_aware_classification), so the permuted-text run is the one whose difference from "
            "progressive measures the text's meaning."
        )
    return (
        "The class scores are the detector's own rows here (model.class_scores: linear) and the fusion reads the class "
        "texts as a set, so permuting them among the classes cannot change AP: the random-text run is the test of "
        "what the text's content adds."
    )


def conclusion(figures: dict[str, list[dict]]) -> list[dict]:
    """Progressive's final AP against the base and each control that has finished seeds."""
    if "progressive" not in figures:
        return []
    progressive = [seed["final_AP"] for seed in figures["progressive"]]
    answers = []
    for other, question in QUESTIONS.items():
        if other == "base":
            verdict, sentence = compare(
                "progressive", "the base detector", progressive, [s["base_AP"] for s in figures["progressive"]]
            )
        elif other in figures:
            verdict, sentence = compare(
                "progressive", other, progressive, [seed["final_AP"] for seed in figures[other]]
            )
        else:
            continue
        answers.append({"question": question, "against": other, "verdict": verdict, "sentence": sentence})
    return answers


def held_out_sentence(results: dict) -> str:
    """The held-out-class test in one sentence: the mean held-out AP of each variant over the splits, how often the
    text beat random text, and how far the known classes moved from the base."""
    splits = list(results.values())

    def mean(variant: str) -> float:
        return statistics.fmean(split["variants"][variant]["held_out_AP"] for split in splits)

    variants = [split["variants"] for split in splits]
    wins = sum(variant["text"]["held_out_AP"] > variant["random"]["held_out_AP"] for variant in variants)
    moved = max(
        abs(values["known_AP"] - split["variants"]["oracle"]["known_AP"])
        for split in splits
        for name, values in split["variants"].items()
        if name != "oracle"
    )
    permuted = [split for split in splits if "permuted" in split["variants"]]
    permuted_text = f", {mean('permuted'):.4f} with permuted text" if len(permuted) == len(splits) else ""
    if wins == len(splits):
        verdict = "the text's content carries over to a class without boxes"
    else:
        verdict = "not every split shows that the text's content carries over"
    return (
        f"scored from their descriptions, the left-out classes reach {mean('text'):.4f} AP on average over "
        f"{len(splits)} splits, against {mean('random'):.4f} with random text{permuted_text}, "
        f"{mean('random_rows'):.4f} with fresh rows and {mean('oracle'):.4f} with the base's own rows (the ceiling); "
        f"the text beats random text in {wins} of {len(splits)} splits: {verdict}. The known classes move by at most "
        f"{moved:.4f} AP from the base."
    )


def write_report(
    grid: Grid, config: TrainConfig, runs: list[str], steps: list[Step], seeds: list[int], notes: list[str]
) -> str:
    """evidence.md, evidence.json and evidence_ap.png from the finished runs; returns the markdown."""
    last_marker = {(step.run, step.seed): step.marker for step in steps}  # a run is finished when its last step is
    trained_runs = [run for run in runs if run != "held_out_classes"]
    finished = {
        run: [grid.output / f"{run}_s{seed}" for seed in seeds if last_marker[(run, seed)].is_file()]
        for run in trained_runs
    }
    held_out = None
    if "held_out_classes" in runs:
        if last_marker[("held_out_classes", seeds[0])].is_file():
            held_out = json.loads((grid.output / "held_out_classes" / "results.json").read_text())
        else:
            notes = [*notes, "held_out_classes: not finished yet: run the command again"]
    notes = notes + [
        f"{run}: {len(seeds) - len(directories)} of {len(seeds)} seeds not finished yet: run the command again"
        for run, directories in finished.items()
        if len(directories) < len(seeds)
    ]
    trained = {
        run: [compare_runs.read_run(directory) for directory in directories]
        for run, directories in finished.items()
        if directories and run != "wise_ft"
    }
    figures = {run: [compare_runs.seed_figures(seed) for seed in run_seeds] for run, run_seeds in trained.items()}
    curves = [json.loads((directory / "curve.json").read_text()) for directory in finished.get("wise_ft", [])]
    answers = conclusion(figures)
    epochs = " + ".join(map(str, grid.budgets.values()))
    lines = [
        f"# Evidence: {grid.init.name} fine-tuned with {grid.config.name}",
        "",
        f"Seeds {', '.join(map(str, seeds))}; progressive: phases {' → '.join(map(str, grid.budgets))} of {epochs} "
        f"epochs; every one-phase run {sum(grid.budgets.values())} epochs. Over seeds: mean ± standard deviation.",
        "",
        "## Conclusion",
        "",
        *[f"- **{answer['question']}** {answer['sentence']}" for answer in answers],
        *([f"- **Can a class be added by its description?** {held_out_sentence(held_out)}"] if held_out else []),
        "",
        *([meaning_note(config)] if TEXT_RUNS.keys() & figures.keys() else []),
        "A difference counts as shown when it exceeds the seed spread: the larger standard deviation over seeds of the "
        "two runs' final AP.",
        "",
        "## Runs",
        "",
        *[f"- {run}: {RUNS[run]}" for run in runs],
        "",
    ]
    if figures:
        compare_runs.plot(trained, grid.output / "evidence_ap.png")
        lines += [*compare_runs.summary_rows(figures), "", "![AP per step of every run](evidence_ap.png)", ""]
        lines += ["## Per class: final AP − base AP", "", *compare_runs.class_delta_rows(figures), ""]
    if curves:
        lines += ["## WiSE-FT of joint_2e-4 (AP of each mix)", "", *compare_runs.wise_ft_rows(curves), ""]
    if held_out:
        title = "## Classes added by description (each split left out of the base, scored from its text, no training)"
        lines += [title, "", held_out_classes.table(held_out), ""]
    if notes:
        lines += ["## Not in this report", "", *[f"- {note}" for note in notes], ""]
    markdown = "\n".join(lines)
    atomic_write_text(grid.output / "evidence.md", markdown)
    record = {
        "seeds": seeds,
        "budgets": grid.budgets,
        "runs": figures,
        "wise_ft": curves,
        "conclusion": answers,
        "held_out_classes": held_out,
        "notes": notes,
    }
    atomic_write_text(grid.output / "evidence.json", json.dumps(record, indent=1) + "\n")
    return markdown


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    runs = "\n".join(f"  {name}: {purpose}" for name, purpose in RUNS.items())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, epilog=f"runs:\n{runs}")
    add = parser.add_argument
    add("--config", type=Path, required=True, help="the YAML file of train_progressive.py for your data and detector")
    add("--init", type=Path, required=True, help="your converged DEIMv2 checkpoint: the base of every run")
    add("--seeds", type=int, nargs="+", required=True, metavar="N", help="one run of each kind per seed")
    add("--output", type=Path, required=True, help="folder of the runs and the report")
    add("--runs", nargs="+", choices=list(RUNS), default=DEFAULT_RUNS, metavar="RUN", help="runs of the grid")
    add("--phases", type=int, nargs="+", choices=[1, 2, 3], default=[1, 2, 3], help="the progressive run's phases")
    add("--budget", type=float, default=1.0, help="factor on every phaseN.epochs of the config")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every phase")
    add("--device", choices=["cpu", "cuda"], help="passed to every phase (default: theirs, cuda when available)")
    add("--python", default=sys.executable, help="interpreter of the phases")
    add("--held-out-count", type=int, default=1, help="held_out_classes: classes left out in each split")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    if args.phases != list(range(1, len(args.phases) + 1)):
        raise EvidenceError(
            f"--phases {' '.join(map(str, args.phases))}: each phase starts from the one before; give 1, 1 2 or 1 2 3"
        )
    if args.budget <= 0:
        raise EvidenceError(f"--budget {args.budget}: must be above 0 (1 trains the config's phaseN.epochs)")
    if not args.init.is_file():
        raise EvidenceError(f"--init {args.init}: not found; pass your converged detector's checkpoint")
    if shutil.which(args.python) is None:
        raise EvidenceError(f"--python {args.python}: not found; pass the interpreter of the project's .venv")
    if "wise_ft" in args.runs and "joint_2e-4" not in args.runs:
        raise EvidenceError("--runs wise_ft mixes joint_2e-4's end point with the base: add joint_2e-4")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_arguments(args)
        config = load_config(args.config, args.set)
        make_output_dir(args.output, "--output")
        runs = [run for run in RUNS if run in args.runs]  # the table's order: wise_ft after joint_2e-4
        seeds = list(dict.fromkeys(args.seeds))
        text_files, notes = write_text_controls(config, args.output, runs)
        runs = [run for run in runs if run not in TEXT_RUNS or run in text_files]
        num_classes = len(held_out_classes.class_prompts(config))
        if "held_out_classes" in runs and not 1 <= args.held_out_count <= num_classes - 2:
            runs.remove("held_out_classes")
            notes.append(
                f"held_out_classes skipped: {num_classes} classes allow 1 to {num_classes - 2} left out (two known "
                f"classes must remain), --held-out-count is {args.held_out_count}"
            )
        grid = Grid(
            config=args.config.resolve(),
            init=args.init.resolve(),
            output=args.output,
            overrides=args.set,
            device=["--device", args.device] if args.device else [],
            budgets=phase_budgets(config, args.phases, args.budget),
            class_head_lr=config.phase2.lr,
            text_files=text_files,
            held_out_count=args.held_out_count,
        )
        steps = grid_steps(runs, seeds, grid)
        notes += run_grid(steps, args.python)
        print(write_report(grid, config, runs, steps, seeds, notes))
        print(f"written: {args.output / 'evidence.md'}, evidence.json, evidence_ap.png")
        return 0
    except UserError as error:
        return report(error)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue (finished phases are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `kill` ends the grid like Ctrl-C: the running phase is stopped and its lock removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    sys.exit(main())
