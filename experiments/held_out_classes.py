"""Classes added back by their descriptions: the zero-shot AP of classes a converged detector has no row for.

    python experiments/held_out_classes.py --config my.yaml --init my_detector.pth --output runs/held_out \\
        [--count 1] [--offsets 0 1 ...] [--descriptions names.yaml] [--set KEY=VALUE ...] [--device cuda]

For each split (``--count`` of the K classes, every K/count-th from an offset in the dataset's category order: picked
by position, not for having neighbours; by default every class alone in turn), the base detector loses the split's
rows in every class-dependent tensor: an official checkpoint of the K − n known classes. The validation file is
rewritten with the known categories first and the held-out ones after them (so the known classes are the checkpoint's,
in category-id order), and every variant is evaluated with the user's command, reading the per-class AP from its
``metrics:`` line:

    train_progressive.py --config my.yaml --phase 2 --init known.pth --eval-only --set model.new_classes=text
        --set text_encoder.precomputed=<K rows> ...

- ``text``: the config's class texts (``data.classes`` through its text model, or its ``text_encoder.precomputed``
  rows; ``--descriptions`` replaces the descriptions);
- ``permuted`` (splits of two classes or more): the held-out rows permuted among the held-out classes (same geometry,
  wrong descriptions);
- ``random``: random unit vectors for the held-out rows;
- ``random_rows``: ``model.new_classes: random``, fresh linear rows (no text in the scores);
- ``oracle``: the base detector with its own rows (linear heads), the ceiling.

The base must be a detector without text fusion: an official DEIMv2 checkpoint or a phase-0 one (its EMA weights).
Writes ``results.json`` (per split and variant: held-out AP, known AP and every class's AP) and ``results.md``.
"""

import argparse
import contextlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

import train_progressive
from deim_lib.checkpoint import CLASS_HEAD_PREFIXES, detector_state_dict, read_checkpoint
from deim_lib.cli import HelpFormatter, report
from deim_lib.errors import UserError
from multimodal.config import TrainConfig, load_config
from multimodal.model.text_encoder import load_text_embeddings

VARIANTS = ("oracle", "text", "permuted", "random", "random_rows")


class HeldOutError(UserError):
    """A base or class list the test cannot use; the message says why and the fix."""


@dataclass(frozen=True)
class Setup:
    """What every evaluation of the test shares: the user's config (with ``--set``), base and device."""

    config_file: Path | None
    overrides: list[str]
    init: Path
    device: str | None  # None: train_progressive.py's default (cuda when available)

    def config(self) -> TrainConfig:
        return load_config(self.config_file, self.overrides)


def split_classes(offset: int, num_classes: int, count: int) -> list[int]:
    """Class indices round(offset + j·num_classes/count) mod num_classes, j < count."""
    return sorted({round(offset + j * num_classes / count) % num_classes for j in range(count)})


def class_prompts(config: TrainConfig) -> dict[str, list[str]]:
    """Class name → descriptions: ``data.classes``, else the validation set's category names in id order."""
    if config.data.classes:
        return dict(config.data.classes)
    annotations = Path(config.data.val_annotations)
    if not annotations.is_file():
        raise HeldOutError(f"data.val_annotations {annotations}: not found; the class list comes from it")
    categories = sorted(json.loads(annotations.read_text())["categories"], key=lambda category: category["id"])
    return {category["name"]: [category["name"]] for category in categories}


def class_texts(config: TrainConfig, cache_dir: Path, descriptions: Path | None = None) -> np.ndarray:
    """The K class texts float32 [K, D] in the dataset's category order, as the config makes them; ``descriptions``
    (a YAML file of class name → description) replaces the config's descriptions."""
    prompts = class_prompts(config)
    if descriptions is not None:
        replaced = yaml.safe_load(descriptions.read_text())
        missing = [name for name in prompts if name not in replaced]
        if missing:
            raise HeldOutError(f"--descriptions {descriptions}: no description of {missing[:5]}; add them")
        prompts = {name: [replaced[name]] if isinstance(replaced[name], str) else replaced[name] for name in prompts}
    return load_text_embeddings(prompts, config.text_encoder, cache_dir).embeddings.numpy()


def reorder_rows(state: dict, order: list[int]) -> dict:
    """``state`` with the class-dependent rows taken in ``order`` (class indices); the denoising embedding keeps its
    padding row last."""
    reordered = {}
    for key, value in state.items():
        if key.startswith(CLASS_HEAD_PREFIXES):
            rows = [*order, value.shape[0] - 1] if key.startswith("decoder.denoising_class_embed.") else order
            value = value[rows].clone()
        reordered[key] = value
    return reordered


def base_state(init: Path, num_classes: int) -> dict:
    """The base detector's weights, checked to be a detector of ``num_classes`` classes without text fusion."""
    checkpoint = read_checkpoint(init)
    if checkpoint.get("fusion"):
        raise HeldOutError(
            f"--init {init}: a phase-{checkpoint.get('phase')} checkpoint with text fusion; the test needs the base "
            "detector (an official checkpoint or a phase-0 one)"
        )
    state, _ = detector_state_dict(checkpoint, init)
    rows = state["decoder.enc_score_head.weight"].shape[0]
    if rows != num_classes:
        raise HeldOutError(f"--init {init}: {rows} classes, the config's data has {num_classes}; use the same classes")
    return state


def prepare_split(setup: Setup, work: Path, held: list[int], rows: np.ndarray, seed: int = 0) -> dict:
    """Write the split's checkpoints, validation file and text rows (``rows``: the K class texts in category order)
    into ``work``; returns their paths and the class names."""
    work.mkdir(parents=True, exist_ok=True)
    config = setup.config()
    coco = json.loads(Path(config.data.val_annotations).read_text())
    categories = sorted(coco["categories"], key=lambda category: category["id"])
    known = [k for k in range(len(categories)) if k not in held]
    order = known + held  # the dataset's class order: the known classes first
    state = base_state(setup.init, len(categories))
    torch.save({"model": reorder_rows(state, known)}, work / "known.pth")
    torch.save({"model": reorder_rows(state, order)}, work / "oracle.pth")
    new_id = {categories[index]["id"]: position + 1 for position, index in enumerate(order)}
    coco["categories"] = [categories[index] | {"id": position + 1} for position, index in enumerate(order)]
    coco["annotations"] = [a | {"category_id": new_id[a["category_id"]]} for a in coco["annotations"]]
    (work / "val.json").write_text(json.dumps(coco))
    text = rows.astype(np.float32)[order]
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    variants = {"text": text}
    if len(held) > 1:
        permuted = text.copy()
        shift = np.roll(np.arange(len(known), len(order)), 1)  # every held-out class gets another one's text
        permuted[len(known) :] = text[shift]
        variants["permuted"] = permuted
    random = text.copy()
    noise = np.random.default_rng(seed).standard_normal((len(held), text.shape[1])).astype(np.float32)
    random[len(known) :] = noise / np.linalg.norm(noise, axis=1, keepdims=True)
    variants["random"] = random
    for name, variant_rows in variants.items():
        np.save(work / f"text_{name}.npy", variant_rows)
    names = [categories[index]["name"] for index in order]
    return {
        "work": work,
        "names": names,
        "known": names[: len(known)],
        "held": names[len(known) :],
        "variants": [variant for variant in VARIANTS if variant in variants or variant in ("oracle", "random_rows")],
        "val_images": config.data.val_images,
    }


def command(argv: list[str], log: Path) -> dict | None:
    """``train_progressive.main(argv)`` with its output in ``log``; the metrics of its ``metrics:`` line, if any."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = train_progressive.main(argv)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(output.getvalue())
    if code != 0:
        raise RuntimeError(f"train_progressive.py exited {code}, see {log}:\n{output.getvalue()[-2000:]}")
    line = next((line for line in output.getvalue().splitlines() if line.startswith("metrics: ")), None)
    return json.loads(line.removeprefix("metrics: ")) if line else None


def evaluate(setup: Setup, split: dict, variant: str) -> dict:
    """The user's ``--eval-only`` command for ``variant``; returns the metrics of its ``metrics:`` line."""
    work = split["work"]
    init = work / ("oracle.pth" if variant == "oracle" else "known.pth")
    text = work / f"text_{'text' if variant in ('oracle', 'random_rows') else variant}.npy"
    new_classes = {"oracle": "none", "random_rows": "random"}.get(variant, "text")
    settings = [
        *setup.overrides,
        *(f"data.{kind}_images={split['val_images']}" for kind in ("train", "val")),
        *(f"data.{kind}_annotations={work / 'val.json'}" for kind in ("train", "val")),
        "data.classes={}",  # the names come from the rewritten file, the texts from the rows
        f"text_encoder.precomputed={text}",
        f"model.new_classes={new_classes}",
        "data.num_workers=0",
        "monitor.tensorboard=false",
    ]
    argv = ["--phase", "2", "--init", str(init), "--eval-only", "--output-dir", str(work / "out")]
    argv += ["--config", str(setup.config_file)] if setup.config_file else []
    argv += ["--device", setup.device] if setup.device else []
    argv += [f"--set={value}" for value in settings]
    return command(argv, work / "out" / f"{variant}.log")


def class_mean(metrics: dict, names: list[str]) -> float:
    """Mean AP over ``names`` that have validation boxes (COCO marks the others −1)."""
    values = [metrics["per_class"][name]["AP"] for name in names if metrics["per_class"][name]["AP"] >= 0]
    return float(np.mean(values)) if values else float("nan")


def run(setup: Setup, output: Path, count: int, offsets: list[int] | None, descriptions: Path | None = None) -> dict:
    """Every split and variant; writes results.json and results.md into ``output`` and returns the results."""
    rows = class_texts(setup.config(), output / "text_cache", descriptions)
    num_classes = len(rows)
    if not 1 <= count <= num_classes - 2:
        raise HeldOutError(
            f"--count {count}: with {num_classes} classes hold out 1 to {num_classes - 2}, so that at least two known "
            "classes remain to fit the shared map"
        )
    offsets = list(range(max(1, num_classes // count))) if offsets is None else offsets
    results = {}
    for offset in offsets:
        split = prepare_split(setup, output / f"split_{offset}", split_classes(offset, num_classes, count), rows)
        variants = {}
        for variant in split["variants"]:
            metrics = evaluate(setup, split, variant)
            variants[variant] = {
                "held_out_AP": class_mean(metrics, split["held"]),
                "known_AP": class_mean(metrics, split["known"]),
                "AP": metrics["AP"],
                "per_class": {name: metrics["per_class"][name]["AP"] for name in split["names"]},
            }
            print(
                f"split {offset} {variant}: held-out AP {variants[variant]['held_out_AP']:.4f}, known AP "
                f"{variants[variant]['known_AP']:.4f}",
                file=sys.stderr,
                flush=True,
            )
        results[f"split_{offset}"] = {"held_out": split["held"], "variants": variants}
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (output / "results.md").write_text(table(results) + "\n")
    return results


def table(results: dict) -> str:
    """Markdown: per split, held-out AP / known AP of each variant (the oracle's known AP is the base's)."""
    lines = ["| split | held-out classes | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    for name, split in results.items():
        variants = split["variants"]
        cells = [
            f"{variants[v]['held_out_AP']:.3f} / {variants[v]['known_AP']:.3f}" if v in variants else "—"
            for v in VARIANTS
        ]
        lines.append(f"| {name} | {', '.join(split['held_out'])} | " + " | ".join(cells) + " |")
    return "Cells: held-out AP / known AP; the oracle's known AP is the base's.\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--config", type=Path, help="the YAML file of train_progressive.py for your data and text")
    add("--init", type=Path, required=True, help="the base detector: an official or a phase-0 checkpoint")
    add("--output", type=Path, required=True, help="folder of the splits and the results")
    add("--count", type=int, default=1, help="classes held out in each split")
    add("--offsets", type=int, nargs="+", help="the splits' first class (default: 0 to K/count − 1)")
    add("--descriptions", type=Path, help="YAML of class name → description, replacing the config's")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every evaluation")
    add("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    args = parser.parse_args(argv)
    try:
        if not args.init.is_file():
            raise HeldOutError(f"--init {args.init}: not found; pass the base detector's checkpoint")
        args.output.mkdir(parents=True, exist_ok=True)
        setup = Setup(args.config, args.set, args.init, args.device)
        print(table(run(setup, args.output, args.count, args.offsets, args.descriptions)))
        return 0
    except UserError as error:
        return report(error)


if __name__ == "__main__":
    sys.exit(main())
