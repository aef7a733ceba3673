"""Phase 2 with added classes: on known-class data only, does it raise the zero-shot AP of the held-out classes or
erode it? And with a few labelled images of each held-out class, do text-scored classes learn faster than fresh rows?

    python experiments/held_out_training.py --output runs/held_out_training [--offsets 0 2 4] [--epochs 3]
    python experiments/held_out_training.py --output runs/few_shot --offsets 4 --shots 1 5 20 --seeds 0 1 2 --epochs 4 \
        [--lr 2e-4] [--variants text_low_rank --rank 32]

Per split of ``held_out_classes`` (12 of COCO's 80 classes held out, a 68-class official checkpoint ``known.pth``),
the training file is coco-tiny train + COCO128 (208 images) with the validation file's category list (68 known
classes first, the 12 held-out last) and every box of a held-out class removed (the images stay: their objects are
background), except, with ``--shots K``, the boxes in K images of each held-out class (drawn by ``--seeds``; fewer
when the data has fewer). Phase 2 (fusion + class heads) then trains with the user's command, for the ways of adding
the 12 classes the checkpoint lacks:

- ``text`` (``model.new_classes=text``): every class scored from its CLIP text through one map shared by all classes;
  without boxes of the held-out classes only the shared map carries anything to them;
- ``random_rows`` (``model.new_classes=random``): fresh linear rows for them;
- ``text_rows`` (with ``--shots`` only; ``model.new_classes=text``, ``model.class_scores=linear``): free linear rows
  that start as ``text`` does, so the two differ only in what training may change: the shared map ties the classes
  together (weight decay on W is a prior on the rows through their texts), free rows move alone;
- ``oracle`` (with ``--shots`` only): the original 80-class detector with its own rows, trained the same way;
- ``text_low_rank`` (chosen with ``--variants`` and ``--rank R``): ``text`` with a shared map of rank R
  (``model.text_map_rank``), a stronger tie between the classes; below the full map's rank (at most 64 on atto, its
  query width) it no longer starts exactly at the converged heads, so its start is evaluated too.

Each trained ``phase2_best.pth`` is evaluated with ``--eval-only`` on coco-tiny val (80 images, all 80 classes), and
compared with the start (``held_out_classes.evaluate``) and with the base's known AP (the untrained oracle's).
Writes ``results_training.json`` and ``results_training.md`` into ``--output``.
"""

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from experiments.held_out_classes import (
    Setup,
    class_mean,
    class_texts,
    command,
    evaluate,
    prepare_split,
    split_classes,
)
from experiments.merge_coco import merge

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATASETS = SHARED / "datasets"
VAL_IMAGES = DATASETS / "coco-tiny" / "val2017"
VAL_ANNOTATIONS = DATASETS / "coco-tiny" / "annotations" / "instances_val2017.json"
# The real DEIMv2-Atto of ../shared and the real CLIP texts of COCO's 80 classes, evaluated on coco-tiny val.
COCO = Setup(
    config_file=None,
    overrides=[  # evaluation: the validation images stand in for the training ones
        *(f"data.{kind}_images={VAL_IMAGES}" for kind in ("train", "val")),
        *(f"data.{kind}_annotations={VAL_ANNOTATIONS}" for kind in ("train", "val")),
        f"text_encoder.precomputed={SHARED / 'clip' / 'coco_clip_a+cname.npy'}",
        "data.val_batch_size=40",
    ],
    init=SHARED / "real" / "deimv2_atto_coco.pth",
    device="cpu",
)
HELD_OUT = 12
TRAIN_SOURCES = [
    ("coco-tiny/train2017", "coco-tiny/annotations/instances_train2017.json"),
    ("coco128/train2017", "coco128/annotations/instances_train2017.json"),
]
# variant → (start checkpoint, model.new_classes, model.class_scores, the held_out_classes variant it starts as)
VARIANTS = {
    "text": ("known.pth", "text", "text", "text"),
    "text_rows": ("known.pth", "text", "linear", "text"),  # the same start, as free rows
    "random_rows": ("known.pth", "random", "linear", "random_rows"),
    "oracle": ("oracle.pth", "none", "linear", "oracle"),
    "text_low_rank": ("known.pth", "text", "text", None),  # its start is not one of held_out_classes' variants
}


def training_file(split: dict, shots: int, seed: int) -> Path:
    """coco-tiny train + COCO128 with ``val.json``'s category list and ids; of the held-out classes' boxes only those
    in ``shots`` images per class (drawn with ``seed``) stay."""
    work = split["work"]
    categories = json.loads((work / "val.json").read_text())["categories"]
    merged = merge(DATASETS, TRAIN_SOURCES)
    name = {category["id"]: category["name"] for category in merged["categories"]}
    new_id = {category["name"]: category["id"] for category in categories}
    generator = random.Random(seed)
    labelled = set()  # (class name, image id) of the held-out boxes kept
    for held in split["held"]:
        images = sorted({a["image_id"] for a in merged["annotations"] if name[a["category_id"]] == held})
        labelled |= {(held, image) for image in generator.sample(images, min(shots, len(images)))}
    known = set(split["known"])
    merged["categories"] = categories
    merged["annotations"] = [
        a | {"category_id": new_id[name[a["category_id"]]]}
        for a in merged["annotations"]
        if name[a["category_id"]] in known or (name[a["category_id"]], a["image_id"]) in labelled
    ]
    path = work / f"train_shots{shots}_seed{seed}.json"
    path.write_text(json.dumps(merged))
    return path


def summary(metrics: dict, split: dict) -> dict:
    return {"held_out_AP": class_mean(metrics, split["held"]), "known_AP": class_mean(metrics, split["known"])}


def variant_settings(split: dict, variant: str, rank: int | None) -> list[str]:
    """The ``--set`` values that make ``variant``'s model, on the split's validation file."""
    work = split["work"]
    _, new_classes, class_scores, _ = VARIANTS[variant]
    return [
        f"model.new_classes={new_classes}",
        f"model.class_scores={class_scores}",
        *([f"model.text_map_rank={rank}"] if variant == "text_low_rank" else []),
        f"text_encoder.precomputed={work / 'text_text.npy'}",
        f"data.val_images={VAL_IMAGES}",
        f"data.val_annotations={work / 'val.json'}",
        "data.num_workers=0",
        "data.val_batch_size=40",
        "monitor.tensorboard=false",
    ]


def train_and_evaluate(
    split: dict, train_file: Path, variant: str, epochs: int, seed: int, lr: float | None, rank: int | None
) -> tuple[dict, float]:
    """Phase 2 of ``variant`` on ``train_file``, then its best checkpoint's metrics and the training time."""
    work = split["work"]
    start = VARIANTS[variant][0]
    out = work / f"phase2_{variant}_{train_file.stem}"
    settings = [
        *variant_settings(split, variant, rank),
        f"data.train_images={DATASETS}",
        f"data.train_annotations={train_file}",
        "data.batch_size=8",
        f"phase2.epochs={epochs}",
        *([f"phase2.lr={lr}"] if lr is not None else []),  # default: the phase table's 5e-5
        "phase2.warmup_iters=10",
        "monitor.text_reliance=never",
    ]
    common = ["--phase", "2", "--output-dir", str(out), "--device", "cpu", *(f"--set={s}" for s in settings)]
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    command([*common, "--seed", str(seed), "--init", str(work / start)], out / "train.log")
    seconds = time.perf_counter() - started
    metrics = command([*common, "--init", str(out / "phase2_best.pth"), "--eval-only"], out / "eval.log")
    return metrics, seconds


def run(
    output: Path,
    offsets: list[int],
    epochs: int,
    shots: list[int],
    seeds: list[int],
    lr: float | None,
    only: list[str] | None = None,
    rank: int | None = None,
) -> dict:
    results, rows_of_text = {}, class_texts(COCO.config(), output / "text_cache")
    variants = (
        [variant for variant in VARIANTS if variant in only]
        if only
        else ["text", "random_rows", *(["text_rows", "oracle"] if any(shots) else [])]
    )
    for offset in offsets:
        held = split_classes(offset, num_classes=80, count=HELD_OUT)
        split = prepare_split(COCO, output / f"split_{offset}", held, rows_of_text)
        starts = {
            name: summary(evaluate(COCO, split, VARIANTS[name][3]), split) for name in ("text", "random_rows", "oracle")
        }
        if "text_low_rank" in variants:
            # The "text" start, its shared map factored to the rank: no longer exact below the full map's rank.
            low_rank = dataclasses.replace(COCO, overrides=[*COCO.overrides, f"model.text_map_rank={rank}"])
            starts[f"text_low_rank{rank}"] = summary(evaluate(low_rank, split, "text"), split)
        runs = []
        for shot in shots:
            for seed in seeds:
                train_file = training_file(split, shot, seed)
                for variant in variants:
                    trained, seconds = train_and_evaluate(split, train_file, variant, epochs, seed, lr, rank)
                    runs.append(
                        {
                            "shots": shot,
                            "seed": seed,
                            "variant": variant,
                            **summary(trained, split),
                            "seconds": round(seconds),
                        }
                    )
                    print(f"split {offset}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
        results[f"split_{offset}"] = {
            "held_out": split["held"],
            "epochs": epochs,
            "lr": lr,
            "rank": rank,
            "start": starts,
            "runs": runs,
        }
        (output / "results_training.json").write_text(json.dumps(results, indent=1) + "\n")
    (output / "results_training.md").write_text(table(results))
    return results


def table(results: dict) -> str:
    """Per split, shots and variant: held-out and known AP after phase 2 (mean ± spread over seeds), and the start."""
    lines = ["| split | shots | variant | held-out AP | known AP | seeds |", "|---|---|---|---|---|---|"]
    for name, split in results.items():
        for variant, start in split["start"].items():
            lines.append(f"| {name} | start | {variant} | {start['held_out_AP']:.3f} | {start['known_AP']:.3f} | |")
        groups = sorted({(run["shots"], run["variant"]) for run in split["runs"]})
        for shots, variant in groups:
            runs = [run for run in split["runs"] if (run["shots"], run["variant"]) == (shots, variant)]
            held, known = (spread([run[key] for run in runs]) for key in ("held_out_AP", "known_AP"))
            lines.append(f"| {name} | {shots} | {variant} | {held} | {known} | {len(runs)} |")
    epochs = sorted({split["epochs"] for split in results.values()})
    rates = ", ".join(f"{lr:g}" for lr in sorted({split.get("lr") or 5e-5 for split in results.values()}))
    return (
        f"Phase 2, {', '.join(map(str, epochs))} epochs at lr {rates}, on coco-tiny train + COCO128 with the held-out "
        "classes' boxes in `shots` images per class (0: none); AP on coco-tiny val (80 images). The oracle's start is "
        "the base.\n\n" + "\n".join(lines) + "\n"
    )


def spread(values: list[float]) -> str:
    """Mean ± half the range over seeds (the value alone for one seed)."""
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--shots", type=int, nargs="+", default=[0], help="labelled images per held-out class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the training and the drawn images")
    parser.add_argument("--lr", type=float, help="phase 2's LR (default: the phase table's)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all that apply but the last")
    parser.add_argument("--rank", type=int, help="text_low_rank: the shared map's rank")
    args = parser.parse_args()
    if ("text_low_rank" in (args.variants or [])) != (args.rank is not None):
        parser.error("--rank goes with --variants text_low_rank, and text_low_rank needs --rank")
    results = run(args.output, args.offsets, args.epochs, args.shots, args.seeds, args.lr, args.variants, args.rank)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
