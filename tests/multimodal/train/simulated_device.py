"""A second device for tests on a machine with only a CPU: tensors that say they live on ``DEVICE`` and compute on the
CPU, so that a device bug fails here as it would on a GPU.

CUDA refuses an operation that mixes a GPU tensor with a CPU tensor (a 0-dim CPU tensor passes as a scalar), and every
value the host reads from a GPU tensor makes it wait for the GPU. Inside ``SimulatedDevice`` the same holds for the
tensors on ``DEVICE``: an operation that mixes them with host tensors raises ``DevicePlacementError`` naming the
operation and the project code that ran it, and every copy between host and device and every host read of device
values is recorded as a ``Transfer`` naming that code.

``DEVICE`` is ``meta`` because autograd, ``nn.Module.to`` and ``torch.device`` take it without any hardware (a fake
``cuda`` tensor cannot run a backward pass where there is no GPU). Its tensors keep their real values on the CPU.
"""

import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

DEVICE = torch.device("meta")
PROJECT_DIR = Path(__file__).resolve().parents[3]
_CODE = tuple(str(PROJECT_DIR / name) for name in ("deim_lib", "multimodal", "benchmarks", "train_progressive.py"))
_HOST = torch.device("cpu")
aten = torch.ops.aten
# Operations whose result the host needs before it can go on: on CUDA each one waits for the GPU.
_HOST_READS = {
    aten._local_scalar_dense.default,  # .item(), float(), bool()
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,  # its output size depends on the values
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}


class DevicePlacementError(AssertionError):
    """An operation mixed tensors on the simulated device with host tensors (CUDA would refuse it)."""


@dataclass(frozen=True)
class Transfer:
    """Values crossing between host and device. ``kind``: "to device" or "to host" (a copy; ", non-blocking" when it
    asks not to block) or "host read" (the host needs a value: ``.item()``, ``bool()``, ``nonzero``, …). ``code``: the
    innermost project function that caused it and its caller, "path:function ← path:function"."""

    kind: str
    code: str


class OnDevice(Tensor):
    """A tensor on ``DEVICE`` whose values are the CPU tensor ``values``."""

    @staticmethod
    def __new__(cls, values: Tensor):
        return Tensor._make_wrapper_subclass(
            cls,
            values.shape,
            strides=values.stride(),
            storage_offset=values.storage_offset(),
            dtype=values.dtype,
            device=DEVICE,
        )

    def __init__(self, values: Tensor):
        self.values = values

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a simulated-device tensor outside SimulatedDevice")

    def tolist(self):  # torch's own refuses tensor subclasses; on CUDA it is a copy to the host, then the list
        return self.cpu().tolist()


def _values(value):
    return value.values if isinstance(value, OnDevice) else value


def _on_device(value):
    return OnDevice(value) if isinstance(value, Tensor) else value


def project_code(lines: bool = False) -> str:
    """The innermost project function on the stack and its caller ("path:function ← path:function")."""
    # Comprehensions are frames of their own before Python 3.12 only: they are left out, so the names do not change.
    frames = [
        frame
        for frame in traceback.extract_stack()
        if frame.filename.startswith(_CODE) and not frame.name.endswith("comp>")
    ]
    names = [
        f"{Path(frame.filename).relative_to(PROJECT_DIR)}:{frame.lineno if lines else frame.name}"
        for frame in reversed(frames[-2:])
    ]
    return " ← ".join(names) or "no project code"


class _DataToDevice(TorchFunctionMode):
    """``torch.tensor(data, device=DEVICE)`` and its kin as a host tensor copied to the device, as on CUDA: they build
    their tensor where no dispatch mode sees it, and on ``meta`` the values would be lost."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and device and torch.device(device) == DEVICE:
            return func(*args, **(kwargs | {"device": _HOST})).to(DEVICE)
        return func(*args, **kwargs)


class SimulatedDevice(TorchDispatchMode):
    """While active, ``tensor.to(DEVICE)``, ``module.to(DEVICE)`` and ``device=DEVICE`` give ``OnDevice`` tensors, and
    every operation on them is checked and run on their CPU values. ``transfers`` lists what crossed, in order."""

    def __init__(self):
        super().__init__()
        self.transfers: list[Transfer] = []
        self._data_to_device = _DataToDevice()

    def __enter__(self):
        self._data_to_device.__enter__()
        return super().__enter__()

    def __exit__(self, *exception):
        super().__exit__(*exception)
        self._data_to_device.__exit__(*exception)

    def _copy(self, to_device: bool, non_blocking: bool) -> None:
        kind = "to device" if to_device else "to host"
        self.transfers.append(Transfer(kind + (", non-blocking" if non_blocking else ""), project_code()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [value for value in tree_leaves((args, kwargs)) if isinstance(value, Tensor)]
        on_device = any(isinstance(value, OnDevice) for value in tensors)
        target = kwargs.get("device")
        to_device = target is not None and target.type == DEVICE.type
        if func is aten._to_copy.default and target is not None and on_device != to_device:
            self._copy(to_device, kwargs.get("non_blocking", False))
            result = func(*tree_map(_values, args), **(kwargs | {"device": _HOST}))
            return OnDevice(result) if to_device else result
        if func is aten.copy_.default and isinstance(args[0], OnDevice) != isinstance(args[1], OnDevice):
            self._copy(isinstance(args[0], OnDevice), kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
            _values(args[0]).copy_(_values(args[1]))
            return args[0]
        host = [value for value in tensors if not isinstance(value, OnDevice) and value.dim() > 0]
        if on_device and host:
            shapes = ", ".join(str(tuple(value.shape)) for value in host)
            raise DevicePlacementError(
                f"{func} mixes tensors on the device with host tensors of shape {shapes} at {project_code(lines=True)}"
            )
        if on_device and _reads_values_on_host(func, args, kwargs):
            self.transfers.append(Transfer("host read", project_code()))
        if to_device:
            kwargs = kwargs | {"device": _HOST}
        result = func(*tree_map(_values, args), **tree_map(_values, kwargs))
        if not (on_device or to_device):
            return result
        if not func._schema.returns:  # e.g. the in-place _foreach_ operations
            return None
        written = _written_arguments(func, args, kwargs)
        if written:  # an in-place or out= operation returns the tensors it wrote: the caller's own objects
            return written[0] if len(written) == 1 else tuple(written)
        return tree_map(_on_device, result)


def _reads_values_on_host(func, args, kwargs) -> bool:
    if func in _HOST_READS:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None  # without it the output size is read from the repeats
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        # A boolean mask as index: the result's size depends on the mask's values.
        return any(index is not None and index.dtype == torch.bool for index in args[1])
    return False


def _written_arguments(func, args, kwargs) -> list:
    written = []
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            written.append(args[position] if position < len(args) else kwargs[argument.name])
    return written
