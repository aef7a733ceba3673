"""Which fusion design lets the text in fastest without costing AP? The measurements of docs/fusion_design.md.

Every run is phase 1 of ``train_progressive.py``, unchanged, with ``configs/coco_tiny.yaml``: the real converged
DEIMv2-Atto (``../shared/real``), real CLIP ViT-B/32 embeddings of "a <class>", coco-tiny train (80 images) and val
(80 val2017 images), 8 epochs × 10 steps at lr 2e-4 after a 10-step warm-up. For each candidate only the class of one
fusion level (and of the text-aware classifier) is replaced before the script runs; the candidates below are the
alternatives that were measured, kept here so that the table can be reproduced, not code the package uses.

    python experiments/fusion_designs.py --out runs/fusion_designs --designs gate centred_scaled --seeds 0 1 2
    python experiments/fusion_designs.py --out runs/fusion_designs --summary docs/fusion_design_runs.json

Each run writes its output directory ``<out>/<design>_s<seed>``; ``--summary`` gathers them into one JSON record.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

import multimodal.model.fusion
import train_progressive


class GatedAttention(nn.Module):
    """The previous design: nn.MultiheadAttention to the class tokens, added through ``tanh(gain · alpha)``, alpha = 0.

    ``gain`` 1 is the original; ``gain`` 100 gives the gate 100× the LR under AdamW (whose steps ignore the
    gradient's scale). ``per_channel`` makes alpha a C-vector (LayerScale).
    """

    def __init__(self, channels: int, text_dim: int, num_heads: int, gain: float = 1.0, per_channel: bool = False):
        super().__init__()
        self.text_proj = nn.Linear(text_dim, channels)
        self.text_norm = nn.LayerNorm(channels)
        self.visual_norm = nn.LayerNorm(channels)
        self.cross_attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.alpha = nn.Parameter(torch.zeros(channels, 1, 1) if per_channel else torch.zeros(()))
        self.gain = gain

    def attend(self, feat: Tensor, text: Tensor) -> Tensor:
        B, C, H, W = feat.shape
        tokens = feat.flatten(2).transpose(1, 2)
        classes = self.text_norm(self.text_proj(text)).unsqueeze(0).expand(B, -1, -1)
        fused, _ = self.cross_attn(self.visual_norm(tokens), classes, classes, need_weights=False)
        return fused.transpose(1, 2).reshape(B, C, H, W)

    def forward(self, feat: Tensor, text: Tensor) -> Tensor:
        return feat + torch.tanh(self.gain * self.alpha) * self.attend(feat, text)


class ZeroOutputAttention(GatedAttention):
    """ControlNet / LoRA-B style: the attention's output projection starts at zero, no gate; output × ``scale``."""

    def __init__(self, channels: int, text_dim: int, num_heads: int, scale: float = 1.0):
        super().__init__(channels, text_dim, num_heads)
        del self.alpha
        nn.init.zeros_(self.cross_attn.out_proj.weight)
        nn.init.zeros_(self.cross_attn.out_proj.bias)
        self.scale = scale

    def forward(self, feat: Tensor, text: Tensor) -> Tensor:
        return feat + self.scale * self.attend(feat, text)


class CentredUnscaled(multimodal.model.fusion.LevelFusion):
    """The package's design without the 1/√C output scale."""

    def __init__(self, channels: int, text_dim: int, num_heads: int):
        super().__init__(channels, text_dim, num_heads)
        self.output_scale = 1.0


class CosineClassifier(nn.Module):
    """The previous text-aware classifier: scale · cos(projected query, class embedding), scale = 0."""

    def __init__(self, query_dim: int, text_dim: int):
        super().__init__()
        self.query_proj = nn.Linear(query_dim, text_dim)
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, query_features: Tensor, text: Tensor) -> Tensor:
        queries = F.normalize(self.query_proj(query_features), dim=-1)
        return self.scale * queries @ F.normalize(text, dim=-1).to(queries.dtype).T


# name → (fusion level class, text-aware classifier class or None for no classifier)
DESIGNS = {
    "gate": (GatedAttention, None),
    "gate_channel": (lambda c, t, h: GatedAttention(c, t, h, per_channel=True), None),
    "gate_lr100": (lambda c, t, h: GatedAttention(c, t, h, gain=100.0), None),
    "zero_output": (ZeroOutputAttention, None),
    "zero_output_scaled": (lambda c, t, h: ZeroOutputAttention(c, t, h, scale=1 / math.sqrt(c)), None),
    "centred": (CentredUnscaled, None),
    "centred_scaled": (multimodal.model.fusion.LevelFusion, None),  # the package's design
    "gate+cosine_classifier": (GatedAttention, CosineClassifier),
    "centred_scaled+classifier": (multimodal.model.fusion.LevelFusion, multimodal.model.fusion.TextAwareClassifier),
}


def run(design: str, seed: int, out: Path, config: str, threads: int) -> Path:
    level, classifier = DESIGNS[design]
    directory = out / f"{design}_s{seed}"
    if (directory / "wall_seconds.txt").is_file():
        return directory  # finished before (written last; phase1_last.pth exists after every epoch)
    designs = train_progressive.FusionDesigns(level, classifier or train_progressive.FusionDesigns.classifier)
    torch.set_num_threads(threads)
    arguments = ["--config", config, "--phase", "1", "--seed", str(seed), "--output-dir", str(directory)]
    if classifier is not None:
        arguments += ["--set", "fusion.text_aware_classification=true"]
    started = time.perf_counter()
    if train_progressive.main(arguments, designs) != 0:
        raise SystemExit(f"{design} seed {seed} failed")
    (directory / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return directory


def summarize(out: Path) -> dict:
    """Per run directory: base AP, per epoch AP and added signal, the last epoch's text reliance, wall time."""
    runs = {}
    for directory in sorted(path for path in out.iterdir() if (path / "metrics.jsonl").is_file()):
        baseline = json.loads((directory / "baseline.json").read_text())
        records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line]
        runs[directory.name] = {
            "base_AP": baseline["AP"],
            "AP": [r["AP"] for r in records],
            "added_signal": [r["text"]["added_signal"] for r in records],
            "classifier_bias": [r["text"]["classifier_bias"] for r in records],
            "reliance": records[-1]["text"].get("reliance"),
            "wall_seconds": float((directory / "wall_seconds.txt").read_text()),
        }
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/fusion_designs"))
    parser.add_argument("--config", default="configs/coco_tiny.yaml")
    parser.add_argument("--designs", nargs="+", choices=list(DESIGNS), default=[])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summary", type=Path, help="write the summary of every run under --out here")
    args = parser.parse_args()
    for design in args.designs:
        for seed in args.seeds:
            run(design, seed, args.out, args.config, args.threads)
    if args.summary:
        args.summary.write_text(json.dumps(summarize(args.out), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
