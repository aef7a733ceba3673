"""Class scores computed from the class descriptions, and classes added to a trained detector.

DEIMv2 scores class k with a free row of every score head (``decoder.enc_score_head`` and each
``decoder.dec_score_head[i]``): a description cannot matter there, and a class without boxes has no row. A
``TextClassScores`` head computes every class's logit from its text embedding t_k through one map shared by all
classes, with no per-class parameter:

    score_k(q) = ⟨t_k − μ, W·q + β⟩ + ⟨h, q⟩ + c

μ is the mean text of the classes the head was fitted to, (h, c) the mean of their rows. ``fit`` solves W, β
by least squares from a trained linear head, exactly when the K centred texts span K − 1 dimensions (K − 1 ≤ the text
width and the texts independent), so converting a converged detector changes none of its scores. A class added later
is scored by its description alone: its row is the known rows composed by the coefficients that express its centred
text in the known classes' centred texts.

With a ``rank`` r, W is the product of a [r, hidden] reduction and a [D_t, r] map (W's best rank-r approximation at
the fit, split evenly between the two): a stronger constraint on how the classes' scores can move together. The fit
stays exact when r is at least the exact W's rank (at most K − 1, the query width and the text width).
"""

import torch
from torch import Tensor, nn

from deim_lib.decoder.deim_transformer import PRIOR_BIAS
from multimodal.config import ConfigError
from multimodal.model.fusion import in_float32


class ClassTexts(nn.Module):
    """The class text embeddings, float32 [K, D_t], as one non-persistent buffer: the single copy that the fusion,
    the text-aware classifier and every text score head read, so that replacing it (text reliance, a new class)
    changes all of them at once."""

    def __init__(self, embeddings: Tensor):
        super().__init__()
        self.register_buffer("embeddings", embeddings.detach().float().clone(), persistent=False)


class TextClassScores(nn.Module):
    """A drop-in for one DEIMv2 score head: ``forward(x)`` x [..., hidden] → logits [..., K] for the K rows of
    ``texts``, computed in float32 (the texts' differences are small); see the module docstring for the formula.

    ``center`` (μ) is persistent: it is part of the fitted map, whereas the texts can change. ``rank``: W factored
    as ``text_map.weight @ reduce.weight`` (None: W is ``text_map.weight`` itself).
    """

    def __init__(self, hidden_dim: int, texts: ClassTexts, center: Tensor, rank: int | None = None):
        super().__init__()
        self.texts = texts
        self.register_buffer("center", center.detach().float().clone())
        self.reduce = nn.Identity() if rank is None else nn.Linear(hidden_dim, rank, bias=False)
        self.text_map = nn.Linear(hidden_dim if rank is None else rank, center.shape[-1])  # W (or its left factor), β
        self.shared = nn.Linear(hidden_dim, 1)  # h and c

    def forward(self, x: Tensor) -> Tensor:
        with in_float32(x.device.type):
            x = x.float()
            return self.text_map(self.reduce(x)) @ (self.texts.embeddings - self.center).T + self.shared(x)


def _solve(known_text: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
    """(μ, X, mean row, relative residual) with (known_text − μ)·X ≈ rows − mean row, least squares of least norm,
    in float64. ``rows``: one row per known class (a head's [weight | bias], or embedding rows)."""
    text, rows = known_text.double(), rows.double()
    center, mean_row = text.mean(dim=0), rows.mean(dim=0)
    solution = torch.linalg.pinv(text - center) @ (rows - mean_row)
    return center, solution, mean_row, _residual(text, center, solution, mean_row, rows)


def _residual(text: Tensor, center: Tensor, solution: Tensor, mean_row: Tensor, rows: Tensor) -> float:
    """How far the map gives ``rows`` for ``text``: ‖(text − μ)·X + mean row − rows‖ / ‖rows‖, in float64."""
    fitted = (text.double() - center) @ solution + mean_row
    return float((fitted - rows.double()).norm() / rows.double().norm().clamp_min(1e-12))


def fit(head: nn.Linear, texts: ClassTexts, known: Tensor, rank: int | None = None) -> tuple[TextClassScores, float]:
    """A ``TextClassScores`` head that gives the classes ``known`` (indices into ``texts``, in the order of ``head``'s
    rows) exactly ``head``'s logits; returns it with the fit's relative residual (0 up to rounding when exact). With
    ``rank``, W is truncated to its best rank-``rank`` approximation, and the residual says what that cost."""
    if rank is not None and rank > min(head.in_features, texts.embeddings.shape[1]):
        raise ConfigError(
            f"model.text_map_rank: {rank} exceeds the rank a map from the queries ({head.in_features} wide) to the "
            f"texts ({texts.embeddings.shape[1]} wide) can have; lower it, or leave it unset for the full map"
        )
    rows = torch.cat([head.weight.detach(), head.bias.detach()[:, None]], dim=1)
    center, solution, mean_row, residual = _solve(texts.embeddings[known], rows)
    scores = TextClassScores(head.in_features, texts, center.float(), rank)
    with torch.no_grad():
        if rank is None:
            scores.text_map.weight.copy_(solution[:, :-1])
        else:
            left, singular, right = torch.linalg.svd(solution[:, :-1], full_matrices=False)
            root = singular[:rank].sqrt()
            scores.text_map.weight.copy_(left[:, :rank] * root)
            scores.reduce.weight.copy_(root[:, None] * right[:rank])
            truncated = torch.cat([left[:, :rank] * singular[:rank] @ right[:rank], solution[:, -1:]], dim=1)
            residual = _residual(texts.embeddings[known], center, truncated, mean_row, rows)
        scores.text_map.bias.copy_(solution[:, -1])
        scores.shared.weight.copy_(mean_row[None, :-1])
        scores.shared.bias.copy_(mean_row[-1:])
    scores.fit_residual = residual  # how far from ``head`` it starts; not saved: a loaded map is what it is
    return scores.to(head.weight.device), residual


def _score_heads(decoder: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every score head: the encoder's, then one per decoder layer."""
    return [
        (decoder, "enc_score_head"),
        *((decoder.dec_score_head, str(i)) for i in range(len(decoder.dec_score_head))),
    ]


def fit_residual(detector: nn.Module) -> float:
    """The largest relative residual of the fits that gave ``detector`` its text score heads (0: exact)."""
    return max(getattr(getattr(parent, name), "fit_residual", 0.0) for parent, name in _score_heads(detector.decoder))


def use_text_scores(detector: nn.Module, texts: ClassTexts, known: Tensor, rank: int | None = None) -> float:
    """Replace every score head of ``detector`` by a ``TextClassScores`` fitted to it (W of ``rank``, None: full),
    in place; the detector then has one class per row of ``texts``. ``known[j]``: the row of ``texts`` describing the
    head's class j. Returns the largest fit residual. The denoising queries' class embedding grows the same way, its
    new rows composed."""
    decoder = detector.decoder
    residual = 0.0
    for parent, name in _score_heads(decoder):
        scores, error = fit(getattr(parent, name), texts, known, rank)
        setattr(parent, name, scores)
        residual = max(residual, error)
    _resize_denoising_embedding(decoder, known, len(texts.embeddings), texts.embeddings)
    detector.num_classes = decoder.num_classes = len(texts.embeddings)
    return residual


def add_text_rows(detector: nn.Module, texts: ClassTexts, known: Tensor) -> float:
    """Grow every linear score head to one row per text in place: the known classes keep their rows, the others get
    the rows a ``TextClassScores`` head fitted to it gives them (the known rows composed by the texts). The rows
    then train freely, as DEIMv2's do. Returns the largest fit residual."""
    decoder = detector.decoder
    residual = 0.0
    for parent, name in _score_heads(decoder):
        head = getattr(parent, name)
        scores, error = fit(head, texts, known)
        grown = nn.Linear(head.in_features, len(texts.embeddings)).to(head.weight.device)
        with torch.no_grad():
            # The logits of one-hot queries are the rows: W(t − μ) + h per class, and the bias likewise.
            centred = texts.embeddings - scores.center
            grown.weight.copy_(centred @ scores.text_map.weight + scores.shared.weight)
            grown.bias.copy_(centred @ scores.text_map.bias + scores.shared.bias)
            grown.weight[known] = head.weight
            grown.bias[known] = head.bias
        setattr(parent, name, grown)
        residual = max(residual, error)
    _resize_denoising_embedding(decoder, known, len(texts.embeddings), texts.embeddings)
    detector.num_classes = decoder.num_classes = len(texts.embeddings)
    return residual


def add_random_rows(
    detector: nn.Module, known: Tensor, num_classes: int, generator: torch.Generator | None = None
) -> None:
    """Grow every linear score head to ``num_classes`` rows in place: the row of class ``known[j]`` is the head's row
    j, the other classes get fresh rows initialised as DEIMv2 initialises a head (the control for text rows)."""
    decoder = detector.decoder
    for parent, name in _score_heads(decoder):
        head = getattr(parent, name)
        grown = nn.Linear(head.in_features, num_classes).to(head.weight.device)
        with torch.no_grad():
            bound = head.in_features**-0.5  # nn.Linear's own initialisation, drawn from ``generator``
            grown.weight.uniform_(-bound, bound, generator=generator)
            grown.bias.fill_(PRIOR_BIAS)
            grown.weight[known] = head.weight
            grown.bias[known] = head.bias
        setattr(parent, name, grown)
    _resize_denoising_embedding(decoder, known, num_classes, None, generator)
    detector.num_classes = decoder.num_classes = num_classes


def _resize_denoising_embedding(
    decoder: nn.Module,
    known: Tensor,
    num_classes: int,
    text: Tensor | None,
    generator: torch.Generator | None = None,
) -> None:
    """The denoising queries' class embedding for ``num_classes`` classes (+ the zero padding row, last): known
    classes keep their rows; new ones are composed from them by their texts, or drawn as nn.Embedding draws."""
    old = getattr(decoder, "denoising_class_embed", None)
    if old is None:
        return
    weight = old.weight.detach()
    grown = nn.Embedding(num_classes + 1, weight.shape[1], padding_idx=num_classes).to(weight.device)
    with torch.no_grad():
        new = torch.ones(num_classes, dtype=torch.bool)
        new[known] = False
        if text is not None:
            center, solution, mean_row, _ = _solve(text[known], weight[:-1])
            composed = (text.double() - center) @ solution + mean_row
            grown.weight[:-1] = composed.to(weight.dtype)
        else:
            grown.weight.normal_(generator=generator)
        grown.weight[known] = weight[:-1]
        grown.weight[num_classes] = 0
    decoder.denoising_class_embed = grown
