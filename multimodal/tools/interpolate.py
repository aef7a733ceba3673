"""WiSE-FT: weight-space mixes of a base detector and its fine-tuned version, evaluated along the line between them.

    python -m multimodal.tools.interpolate --base deimv2_atto_coco.pth --finetuned runs/joint/phase1_last.pth \\
        --weights 0 0.25 0.5 0.75 1 --output runs/joint_wise_ft [--choose 0.5] [--config configs/coco_tiny.yaml]

``mix(w) = (1 − w)·base + w·fine-tuned``, tensor by tensor (Wortsman et al., 2022, "Robust fine-tuning of zero-shot
models"). Parameters the base does not have (the text fusion, when the base is an official checkpoint) mix from
their identity values: the fusion's zero-initialised projections are scaled by w, the rest is the fine-tuned one's,
so w = 0 gives exactly the base detector's detections and w = 1 exactly the fine-tuned model's. Integer buffers come
from the nearer end. The fine-tuned side is a checkpoint of ``train_progressive.py`` (its EMA weights, as evaluated);
the base is an official DEIMv2 checkpoint or another phase checkpoint of the same detector.

Every mix is evaluated on the validation set of the fine-tuned run's config (or ``--config``); a ``--choose`` weight
that ``--weights`` lacks is evaluated as well. Written to ``--output``: ``curve.json`` (AP, AP50 and per-class AP of
every weight), ``curve.png`` (the saved weight marked), and ``wise_ft.pth``, the chosen mix as a phase checkpoint,
also readable as an official DEIMv2 checkpoint. The chosen mix is ``--choose``, or else the best AP; of tied weights
the one nearest the base, so that when every weight ties, the base is kept (and said so).
"""

import argparse
import copy
import dataclasses
import json
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from deim_lib.checkpoint import detector_state_dict, read_checkpoint
from deim_lib.cli import HelpFormatter, make_output_dir, report
from deim_lib.errors import CheckpointError, UserError
from deim_lib.evaluate import evaluate_detector
from deim_lib.postprocessor import PostProcessor
from deim_lib.variants import get_variant
from multimodal.config import ConfigError, config_from_values, load_config, stored_section
from multimodal.data import loaders
from multimodal.files import atomic_write, atomic_write_text
from multimodal.model.assemble import Weights, assemble_model, checkpoint_model, checkpoint_spec
from multimodal.model.detector import split_state
from multimodal.train.checkpoint import (
    PhaseCheckpoint,
    PhaseProgress,
    is_phase_checkpoint,
    read_phase_checkpoint,
    save_phase_checkpoint,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def mix_states(base: dict[str, Tensor], tuned: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    """(1 − weight)·base + weight·tuned for floating tensors (exactly ``base`` at 0, ``tuned`` at 1)."""
    if set(base) != set(tuned) or any(base[k].shape != tuned[k].shape for k in tuned):
        raise CheckpointError("--base and --finetuned hold different detectors (other variant, size or class count)")
    mixed = {}
    for key, value in tuned.items():
        if value.is_floating_point():
            mixed[key] = torch.lerp(base[key].to(value.dtype), value, weight)
        else:
            mixed[key] = (value if weight >= 0.5 else base[key]).clone()
    return mixed


def base_state(path: str | Path, tuned_checkpoint: PhaseCheckpoint, tuned_path: str, tuned_model) -> dict[str, Tensor]:
    """The base's full state for ``tuned_model``'s keys: its detector built as the tuned run built it (score heads
    fitted to the base's rows when the tuned run computes the scores from the text, the classes it added), and its
    fusion or the identity fusion."""
    data = read_checkpoint(path)
    if is_phase_checkpoint(data):
        base = PhaseCheckpoint.from_dict(data, path)
        (detector, fusion), names = base.weights(), list(base.info.class_names)
    else:
        (detector, fusion), names = (detector_state_dict(data, path)[0], {}), None
    spec = checkpoint_spec(tuned_checkpoint, tuned_path)
    new_classes = stored_section(tuned_checkpoint.info.config, "model").new_classes
    spec = dataclasses.replace(spec, new_classes=new_classes)
    try:
        model = assemble_model(spec, Weights(str(path), detector, None, names)).model
    except (CheckpointError, ConfigError) as error:
        raise CheckpointError(f"--base and --finetuned hold different detectors ({error})") from None
    state = {f"detector.{key}": value for key, value in split_state(model.state_dict())[0].items()}
    if tuned_model.uses_text:
        identity = split_state(copy.deepcopy(tuned_model).to_identity().state_dict())[1]
        state |= fusion or identity
    return state


def choose_weight(points: list[dict], choose: float | None) -> tuple[float, str]:
    """The weight to save (``choose``, or the best AP; of tied weights the one nearest the base) and the line that
    says why."""
    if choose is not None:
        return choose, f"weight {choose:g}, as --choose asks"
    best_ap = max(point["AP"] for point in points)
    tied = sorted(point["weight"] for point in points if point["AP"] == best_ap)
    nearest_base = tied[0]
    if len(tied) == 1:
        return nearest_base, f"weight {nearest_base:g}, the best AP {best_ap:.4f}"
    kept = "the base (weight 0)" if nearest_base == 0 else f"weight {nearest_base:g}, the nearest the base"
    if len(tied) == len(points):
        return nearest_base, f"{kept}: all {len(points)} weights tie at AP {best_ap:.4f}"
    weights = ", ".join(f"{weight:g}" for weight in tied)
    return nearest_base, f"{kept}: weights {weights} tie for the best AP {best_ap:.4f}"


def curve_figure(points: list[dict], chosen: float) -> "Figure":
    """AP and AP50 against the mixing weight, with the saved weight marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), layout="constrained")
    points = sorted(points, key=lambda point: point["weight"])
    weights = [point["weight"] for point in points]
    for metric in ("AP", "AP50"):
        axis.plot(weights, [point[metric] for point in points], marker="o", label=metric)
    chosen_ap = next(point["AP"] for point in points if point["weight"] == chosen)
    axis.axvline(chosen, color="grey", linestyle="--", linewidth=0.8)
    axis.plot(
        [chosen], [chosen_ap], marker="*", markersize=14, color="red", linestyle="none", label=f"saved: {chosen:g}"
    )
    axis.set_xlabel("mixing weight (0: base, 1: fine-tuned)")
    axis.set_ylabel("COCO metric, validation")
    axis.set_title("WiSE-FT: base ↔ fine-tuned")
    axis.grid(alpha=0.3)
    axis.legend()
    return figure


def plot_curve(points: list[dict], chosen: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure = curve_figure(points, chosen)
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=110))
    plt.close(figure)


def interpolate(
    base: str,
    finetuned: str,
    weights: Sequence[float],
    output: Path,
    config_path: str | None = None,
    choose: float | None = None,
    device: str = "cpu",
) -> dict:
    """Evaluate every mix, write curve.json, curve.png and wise_ft.pth to ``output``; returns the curve record."""
    tuned_checkpoint = read_phase_checkpoint(finetuned)
    info = tuned_checkpoint.info
    config = load_config(config_path) if config_path else config_from_values(info.config)
    model = checkpoint_model(tuned_checkpoint, finetuned).eval().to(device)
    tuned = {key: value.clone() for key, value in model.state_dict().items()}
    start = base_state(base, tuned_checkpoint, finetuned, model)
    dataset = loaders.build_val_dataset(config.data, get_variant(info.variant), info.image_size)
    if dataset.class_names != info.class_names:
        raise ConfigError(f"the validation set's classes differ from the classes {finetuned} was trained on")
    loader = loaders.build_val_loader(dataset, config.data.val_batch_size, config.data.num_workers)
    if choose is not None and choose not in weights:
        print(f"--choose {choose:g} is not among --weights: evaluating it as well")
        weights = [*weights, choose]
    points, postprocessor = [], PostProcessor(len(info.class_names))
    for weight in weights:
        model.load_state_dict(mix_states(start, tuned, weight))
        metrics, _ = evaluate_detector(
            model,
            postprocessor,
            loader,
            torch.device(device),
            dataset.category_ids,
            dataset.coco,
            progress=False,
        )
        points.append(
            {"weight": weight, "AP": metrics["AP"], "AP50": metrics["AP50"], "per_class": metrics["per_class"]}
        )
        print(f"weight {weight:g}: AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}")
    chosen, reason = choose_weight(points, choose)
    record = {"base": str(base), "finetuned": str(finetuned), "points": points, "chosen": chosen}
    atomic_write_text(output / "curve.json", json.dumps(record, indent=1) + "\n")
    plot_curve(points, chosen, output / "curve.png")

    detector, fusion = split_state(mix_states(start, tuned, chosen))
    progress = copy.deepcopy(tuned_checkpoint.progress)
    chosen_ap = next(point["AP"] for point in points if point["weight"] == chosen)
    mixed = PhaseCheckpoint(
        phase=tuned_checkpoint.phase,
        kind="best",
        info=info,
        progress=PhaseProgress(
            progress.state,
            [*progress.lineage, uuid.uuid4().hex[:8]],
            [{"weight": p["weight"], "AP": p["AP"], "AP50": p["AP50"]} for p in points],
            chosen_ap,
            progress.baseline,
        ),
        detector=detector,
        fusion=fusion,
        ema_detector=detector,  # official tools read ``ema.module`` first
        ema_fusion=fusion,
        ema_updates=0,
        text_embeddings=tuned_checkpoint.text_embeddings,
        finished=True,
    )
    save_phase_checkpoint(output / "wise_ft.pth", mixed)
    print(f"saved {reason} → {output / 'wise_ft.pth'}")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--base", required=True, help="official DEIMv2 checkpoint or a phase checkpoint (weight 0)")
    parser.add_argument("--finetuned", required=True, help="a checkpoint of train_progressive.py (weight 1)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1], help="mixes to evaluate")
    parser.add_argument("--output", type=Path, required=True, help="folder for curve.json, curve.png, wise_ft.pth")
    parser.add_argument("--choose", type=float, help="the weight saved as wise_ft.pth (default: the best AP)")
    parser.add_argument("--config", help="config whose data.val_* to evaluate on (default: the fine-tuned run's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    try:
        if any(not 0 <= weight <= 1 for weight in [*args.weights, *([args.choose] if args.choose is not None else [])]):
            raise ConfigError("--weights and --choose lie in [0, 1] (0: the base, 1: the fine-tuned model)")
        interpolate(
            args.base,
            args.finetuned,
            args.weights,
            make_output_dir(args.output, "--output"),
            args.config,
            args.choose,
            args.device,
        )
    except UserError as error:
        return report(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
