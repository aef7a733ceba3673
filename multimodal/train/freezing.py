"""Progressive unfreezing: which parts train in a phase, how frozen parts stay frozen, and the proof that they did.

Frozen means: ``requires_grad`` off, eval mode (BatchNorm uses and keeps its running statistics, dropout off) through
every ``model.train()``, never in an optimizer, and bit-identical parameters and buffers at the end of the phase.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class FrozenTensorChangedError(RuntimeError):
    """A tensor of a frozen part changed during a phase: a bug, never a user error."""


@dataclass
class PhasePolicy:
    """The result of applying a phase: the frozen subtrees and a snapshot of every frozen tensor."""

    frozen_modules: list[nn.Module]
    frozen_tensors: dict[str, Tensor]

    def set_train_mode(self, model: nn.Module, output_switches: Sequence[nn.Module] = ()) -> None:
        """``model.train()`` with the frozen subtrees back in eval mode.

        ``output_switches`` (DEIMv2's decoder and its inner layer stack) follow training even when frozen: their flag
        only selects the training output structure (auxiliary, pre and denoising outputs) that the loss needs; the
        modules that hold statistics or dropout below them stay in eval mode.
        """
        model.train()
        for module in self.frozen_modules:
            module.eval()
        for module in output_switches:
            module.training = True

    def verify_frozen(self, model: nn.Module) -> int:
        """The number of frozen tensors checked; raises if any of them is not bit-identical to its snapshot."""
        current = _named_tensors(model)
        changed = [name for name, value in self.frozen_tensors.items() if not torch.equal(current[name].cpu(), value)]
        if changed:
            raise FrozenTensorChangedError(f"{len(changed)} frozen tensors changed in the phase, e.g. {changed[:3]}")
        return len(self.frozen_tensors)


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def _frozen_subtrees(module: nn.Module) -> Iterable[nn.Module]:
    """Maximal submodules without a trainable parameter (the module itself when it has none)."""
    if not any(parameter.requires_grad for parameter in module.parameters()):
        yield module
        return
    for child in module.children():
        yield from _frozen_subtrees(child)


def constant_parameters(model: nn.Module) -> frozenset[int]:
    """Parameters built non-trainable (DEIMv2's ``up``/``reg_scale``, a frozen HGNetv2 stem); call before any phase."""
    return frozenset(id(p) for p in model.parameters() if not p.requires_grad)


def apply_phase(
    model: nn.Module, parts: dict[str, Sequence[nn.Module]], trainable: Sequence[str], constants: frozenset[int]
) -> PhasePolicy:
    """Freeze everything in ``model`` except the modules of the ``trainable`` parts and snapshot what is frozen.

    ``constants`` (from ``constant_parameters`` on the freshly built model) stay non-trainable whatever the phase.
    """
    unknown = [name for name in trainable if name not in parts]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; the model has {sorted(parts)}")
    model.requires_grad_(False)
    for name in trainable:
        for module in parts[name]:
            for parameter in module.parameters():
                parameter.requires_grad_(id(parameter) not in constants)

    frozen_modules = list(_frozen_subtrees(model))
    frozen_ids = {id(module) for module in frozen_modules}
    frozen_names = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        if id(module) in frozen_ids:
            base = f"{prefix}." if prefix else ""
            frozen_names.update(base + name for name, _ in module.named_buffers(remove_duplicate=False))
    frozen_names.update(name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad)
    tensors = _named_tensors(model)
    # Kept on the CPU: the snapshot must not cost accelerator memory (it holds the whole frozen backbone).
    snapshot = {name: tensors[name].detach().to("cpu", copy=True) for name in sorted(frozen_names)}
    return PhasePolicy(frozen_modules, snapshot)


def compile_frozen_parts(
    parts: dict[str, Sequence[nn.Module]], names: Sequence[str] = ("backbone", "encoder")
) -> list[str]:
    """``torch.compile`` in place the modules of the ``names`` parts that have no trainable parameter; their names.

    ``Module.compile`` keeps the module tree, state_dict keys and hooks, and compiling an already compiled module (a
    later phase, or a deep copy such as the EMA's) reuses the compiled code. A new input shape compiles again, with
    the dimensions seen changing (the batch) then compiled as dynamic (torch's automatic dynamic shapes).
    """
    compiled = []
    for name in names:
        modules = parts[name]
        if any(parameter.requires_grad for module in modules for parameter in module.parameters()):
            continue
        for module in modules:
            module.compile()
        compiled.append(name)
    return compiled
