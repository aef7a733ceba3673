"""The rules of progressive fine-tuning, one row per phase: the single source for config defaults, validation, the
command line and the forgetting monitor. Plain data, no torch: ``train_progressive.py --help`` reads it.
"""

from dataclasses import dataclass

# The parts a phase can train (``MultimodalDetector.parts`` in multimodal/model/detector.py); "decoder" includes both
# head groups.
PART_NAMES = ("backbone", "encoder", "decoder", "class_heads", "box_heads", "fusion")


@dataclass(frozen=True)
class PhaseRule:
    """What a phase is for and what it may do.

    ``lr`` and ``weight_decay`` None mean the variant's DEIMv2 recipe. ``uses_text``: the model carries the text
    fusion (phases ≥ 1).
    ``compares_to_base``: its epochs are measured against the base detector (phase 0 trains the base itself).
    ``augmentation`` and ``epochs`` are the defaults of the phase's config section.
    """

    index: int
    purpose: str
    trainable: tuple[str, ...]
    lr: float | None
    weight_decay: float | None
    uses_text: bool
    compares_to_base: bool
    augmentation: str
    epochs: int


PHASES = (
    PhaseRule(
        index=0,
        purpose="train a base detector when you have none",
        trainable=("backbone", "encoder", "decoder"),
        lr=None,
        weight_decay=None,
        uses_text=False,
        compares_to_base=False,
        augmentation="deimv2",
        epochs=72,
    ),
    PhaseRule(
        index=1,
        purpose="warm up the text fusion next to a frozen detector",
        trainable=("fusion",),
        lr=2e-4,
        weight_decay=1e-4,
        uses_text=True,
        compares_to_base=True,
        augmentation="finetune",
        epochs=12,
    ),
    PhaseRule(
        index=2,
        purpose="let classification use the text",
        trainable=("fusion", "class_heads"),
        lr=5e-5,
        weight_decay=1e-4,
        uses_text=True,
        compares_to_base=True,
        augmentation="finetune",
        epochs=12,
    ),
    PhaseRule(
        index=3,
        purpose="adapt the whole decoder (optional)",
        trainable=("fusion", "decoder"),
        lr=2e-5,
        weight_decay=1e-4,
        uses_text=True,
        compares_to_base=True,
        augmentation="finetune",
        epochs=12,
    ),
)
PHASE_INDICES = tuple(rule.index for rule in PHASES)
