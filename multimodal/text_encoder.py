"""Class embeddings from a frozen open_clip text tower, cached on disk, or read from a precomputed [K, D] file.

Every class has a name and one or more descriptions; prompt templates containing ``"{}"`` wrap each description. A
class embedding is the L2-normalised mean over descriptions × templates of the L2-normalised text embeddings, so
adding a paraphrase averages rather than outvotes. Rows follow the insertion order of the ``class_prompts`` mapping,
which must be the detector's class order.
"""

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_TEMPLATES = ("{}",)
RANDOM_INIT_SEED = 0
_ENCODE_BATCH = 256  # prompts per text-tower call; bounds activation memory for long template lists


class TextEncoderError(RuntimeError):
    """A user-facing, one-line problem with the text encoder's inputs, weights or files."""


@dataclass(frozen=True)
class TextEmbeddings:
    """Per-class text embeddings and where they came from.

    ``embeddings``: float32 [K, D], rows L2-normalised, row k = ``class_names[k]``. ``prompts``: class name → the exact
    texts that were embedded (empty lists for a precomputed file). ``source``: model and weights, or the file read.
    """

    embeddings: Tensor
    class_names: list[str]
    prompts: dict[str, list[str]]
    source: str

    def to_dict(self) -> dict:
        """Plain data (one tensor, strings, lists) that survives ``torch.load(weights_only=True)``."""
        return {
            "embeddings": self.embeddings,
            "class_names": list(self.class_names),
            "prompts": {name: list(texts) for name, texts in self.prompts.items()},
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "TextEmbeddings":
        return cls(
            embeddings=data["embeddings"].float(),
            class_names=list(data["class_names"]),
            prompts={name: list(texts) for name, texts in data["prompts"].items()},
            source=str(data["source"]),
        )


def _one_line(error: BaseException, limit: int = 300) -> str:
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= limit else line[:limit] + "…"


@contextmanager
def _quiet_random_init_warning(pretrained: str | None):
    """open_clip warns through the root logger that no weights were loaded; with ``None`` that is the request."""
    if pretrained is not None:
        yield
        return
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


class TextEncoder(nn.Module):
    """Frozen open_clip text tower: ``forward(texts)`` → float32 [N, D] L2-normalised embeddings.

    ``pretrained``: an open_clip tag ("openai", …), a local weights file, or None for random weights drawn from a fixed
    seed (identical on every build, so cached and fresh embeddings agree). The vision tower is dropped after building.
    Always in eval mode without gradients: it is a fixed feature extractor, never fine-tuned.
    """

    def __init__(self, model_name: str, pretrained: str | None, device: str | torch.device = "cpu"):
        super().__init__()
        # Names with a schema ("hf-hub:…", "local-dir:…") are resolved by open_clip itself.
        if ":" not in model_name and model_name not in open_clip.list_models():
            raise TextEncoderError(f"unknown open_clip model {model_name!r}; see open_clip.list_models() for the names")
        try:
            # The random init draws from torch's global generator; a forked, seeded one keeps that deterministic
            # without disturbing the caller's RNG stream.
            with torch.random.fork_rng(devices=[]), _quiet_random_init_warning(pretrained):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = open_clip.create_model(model_name, pretrained=pretrained)
        except (RuntimeError, OSError, ValueError) as error:
            raise TextEncoderError(
                f"cannot build open_clip model {model_name!r} with weights {pretrained!r} ({_one_line(error)}); "
                "set text_encoder.pretrained to a local weights file, or null for random weights"
            ) from None
        try:
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except (RuntimeError, OSError, ValueError, ImportError) as error:
            raise TextEncoderError(
                f"cannot load the tokenizer of {model_name!r} ({_one_line(error)}); Hugging Face tokenizers need "
                "`transformers` and network access on first use"
            ) from None
        model.visual = None  # text-only use: the image tower is the larger half of the weights
        self.model = model.to(device).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        # Frozen feature extractor: stay in eval mode whatever the caller asks.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> Tensor:
        """``texts`` (N strings) → float32 [N, D] with unit-norm rows."""
        chunks = []
        for start in range(0, len(texts), _ENCODE_BATCH):
            tokens = self.tokenizer(list(texts[start : start + _ENCODE_BATCH])).to(self.device)
            chunks.append(self.model.encode_text(tokens).float())
        return F.normalize(torch.cat(chunks), dim=-1)

    def encode_classes(self, prompts: Mapping[str, Sequence[str]]) -> Tensor:
        """Class name → prompt texts (``build_prompts``) → float32 [K, D] on the CPU: mean per class, unit rows."""
        embedded = self([text for texts in prompts.values() for text in texts])
        sizes = [len(texts) for texts in prompts.values()]
        means = torch.stack([chunk.mean(dim=0) for chunk in embedded.split(sizes)])
        return F.normalize(means, dim=-1).cpu()


def build_prompts(class_prompts: Mapping[str, Sequence[str]], templates: Sequence[str]) -> dict[str, list[str]]:
    """Every description of every class inside every template, description-major: class → list of texts."""
    if not class_prompts:
        raise TextEncoderError("class_prompts is empty: give at least one class with one description")
    bad = [template for template in templates if "{}" not in template]
    if not templates or bad:
        raise TextEncoderError(f"every prompt template must contain '{{}}', got {list(templates)!r}")
    prompts = {}
    for name, descriptions in class_prompts.items():
        if isinstance(descriptions, str) or not descriptions:
            raise TextEncoderError(f"class {name!r} needs a list of one or more descriptions, got {descriptions!r}")
        # str.replace rather than str.format: descriptions or templates may contain other braces.
        prompts[name] = [template.replace("{}", text) for text in descriptions for template in templates]
    return prompts


def weights_identity(pretrained: str | None) -> str:
    """What identifies the weights in the cache key: the tag, a file's absolute path + size + mtime, or the seed."""
    if pretrained is None:
        return f"random-init seed={RANDOM_INIT_SEED}"
    path = Path(pretrained)
    if path.is_file():
        stat = path.stat()
        return f"file {path.resolve()} size={stat.st_size} mtime_ns={stat.st_mtime_ns}"
    return f"tag {pretrained}"


def cache_key(
    class_prompts: Mapping[str, Sequence[str]], templates: Sequence[str], model_name: str, pretrained: str | None
) -> str:
    """sha256 hex of everything the embeddings depend on; class order is part of the key."""
    payload = {
        "model": model_name,
        "weights": weights_identity(pretrained),
        "classes": [[name, list(descriptions)] for name, descriptions in class_prompts.items()],
        "templates": list(templates),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def _read_cache(path: Path) -> TextEmbeddings | None:
    if not path.is_file():
        return None
    try:
        return TextEmbeddings.from_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, EOFError, KeyError, AttributeError):
        return None  # an unreadable or truncated cache entry is recomputed and overwritten


def _write_cache(path: Path, embeddings: TextEmbeddings) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(embeddings.to_dict(), partial)
    os.replace(partial, path)  # readers never see a half-written file


def load_precomputed(path: str | Path, class_names: Sequence[str]) -> TextEmbeddings:
    """Read a [K, D] array (.npy, or .pt holding a tensor) and L2-normalise its rows; K must equal the class count."""
    path = Path(path)
    if not path.is_file():
        raise TextEncoderError(f"precomputed text embeddings {path} do not exist")
    if path.suffix == ".npy":
        array = torch.from_numpy(np.load(path))
    elif path.suffix == ".pt":
        array = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise TextEncoderError(f"precomputed text embeddings {path} must be a .npy or .pt file")
    if not isinstance(array, Tensor) or array.ndim != 2:
        raise TextEncoderError(f"precomputed text embeddings {path} must hold one [K, D] array")
    if array.shape[0] != len(class_names):
        raise TextEncoderError(
            f"precomputed text embeddings {path} have {array.shape[0]} rows but there are {len(class_names)} classes"
        )
    array = array.float()
    if not torch.isfinite(array).all() or (array.norm(dim=-1) == 0).any():
        raise TextEncoderError(f"precomputed text embeddings {path} contain non-finite values or zero rows")
    return TextEmbeddings(
        embeddings=F.normalize(array, dim=-1),
        class_names=list(class_names),
        prompts={name: [] for name in class_names},
        source=f"precomputed {path.resolve()}",
    )


def load_text_embeddings(
    class_prompts: Mapping[str, Sequence[str]],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    model_name: str = "ViT-B-32",
    pretrained: str | None = None,
    cache_dir: str | Path | None = None,
    precomputed: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> TextEmbeddings:
    """Class embeddings float32 [K, D] for ``class_prompts`` (class name → descriptions), in the mapping's order.

    ``precomputed`` wins when given (model and templates are then unused). Otherwise the text tower runs only on a
    cache miss: with ``cache_dir`` the result is stored under the sha256 of model, weights identity, classes,
    descriptions and templates, and a later call with the same inputs reads it back without building the model.
    """
    if precomputed is not None:
        return load_precomputed(precomputed, list(class_prompts))
    prompts = build_prompts(class_prompts, templates)
    cache_path = None
    if cache_dir is not None:
        key = cache_key(class_prompts, templates, model_name, pretrained)
        cache_path = Path(cache_dir) / f"text_embeddings_{key}.pt"
        cached = _read_cache(cache_path)
        if cached is not None:
            return cached
    encoder = TextEncoder(model_name, pretrained, device=device)
    result = TextEmbeddings(
        embeddings=encoder.encode_classes(prompts),
        class_names=list(class_prompts),
        prompts=prompts,
        source=f"open_clip {model_name} ({weights_identity(pretrained)})",
    )
    if cache_path is not None:
        _write_cache(cache_path, result)
    return result
