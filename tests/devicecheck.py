"""A device that is not the CPU, on the CPU: catches tensors created without the right device.

On a GPU, ``torch.arange(n) + x`` with ``x`` on the GPU fails; on the CPU, where every test
runs, it passes, so such bugs first show on a user's cluster. :class:`DeviceCheck` is a
``TorchDispatchMode`` under which the test moves a model and its inputs to a stand-in device
(``torch.device("meta")``, the label only): a tensor moved there becomes an
:class:`OnDevice`, a wrapper whose ``.device`` is the stand-in while its values stay real
(computed on the CPU), so data-dependent code (``nonzero``, ``.item()``, boolean masks) runs as
it would on a GPU. PyTorch's own ``meta`` tensors cannot do that: they have no values.

An operation that mixes an :class:`OnDevice` with a plain CPU tensor of one or more dimensions
raises :class:`WrongDevice` naming the operation and the CPU tensor's shape, as CUDA would
(0-dim CPU tensors are allowed with device tensors, as in PyTorch). Copies across the boundary
(``.to(device)``, ``.cpu()``, ``copy_``) are allowed, as on a GPU. Factory calls with
``device=`` the stand-in give :class:`OnDevice` tensors.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
_CROSSING = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.to.dtype_layout,
             torch.ops.aten._copy_from.default, torch.ops.aten._copy_from_and_resize.default}


class WrongDevice(RuntimeError):
    """A CPU tensor met tensors on the device under test in one operation."""


class OnDevice(torch.Tensor):
    """A CPU tensor (``elem``) presented as a tensor on :data:`DEVICE`; only valid under :class:`DeviceCheck`."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
                                                  dtype=elem.dtype, layout=elem.layout, device=DEVICE,
                                                  requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    def __repr__(self):
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: an OnDevice tensor used outside DeviceCheck")


def _plain(x) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, OnDevice)


def _is_device(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


def _index_on_device(index):
    if isinstance(index, tuple):
        return tuple(_index_on_device(i) for i in index)
    if isinstance(index, list) and all(isinstance(i, (bool, int)) for i in index):
        return torch.tensor(index).to(DEVICE)
    return index


class _Factories(TorchFunctionMode):
    """``torch.tensor(..., device=DEVICE)`` and other factories with ``device=`` build their tensor
    below the dispatcher's Python layer; here they are built on the CPU and moved (-> OnDevice)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], OnDevice):
            # x[[0, 2]]: PyTorch makes the index tensor on x's device below the Python layer
            args = (args[0], _index_on_device(args[1]), *args[2:])
        if func is torch.Tensor.new_tensor and isinstance(args[0], OnDevice) and kwargs.get("device") is None:
            kwargs["device"] = DEVICE  # new_tensor takes self's device, also below the Python layer
        if not _is_device(kwargs.get("device")) or func is torch.Tensor.to:
            return func(*args, **kwargs)
        kwargs["device"] = torch.device("cpu")
        out = func(*args, **kwargs)
        return tree_map(lambda x: x.to(DEVICE) if isinstance(x, torch.Tensor) else x, out)


class DeviceCheck(TorchDispatchMode):
    """``with DeviceCheck() as device: model.to(device); ...``: see the module docstring.

    ``ops``: the names of the operations that ran on the device (for a test to assert that the
    code under test really ran there)."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()
        self._factories = _Factories()

    def __enter__(self) -> torch.device:
        self._factories.__enter__()
        super().__enter__()
        return DEVICE

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._factories.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        leaves, _ = tree_flatten((args, kwargs))
        on_device = any(isinstance(x, OnDevice) for x in leaves)
        to_device = _is_device(kwargs.get("device"))
        if not on_device and not to_device:
            return func(*args, **kwargs)
        if on_device and func not in _CROSSING:
            for x in leaves:
                if _plain(x) and x.dim() > 0 and x.device.type == DEVICE.type:
                    raise RuntimeError(f"{func}: a {DEVICE.type} tensor without values (made by a constructor that "
                                       "DeviceCheck does not intercept); teach tests/devicecheck.py that constructor")
                if _plain(x) and x.dim() > 0:
                    raise WrongDevice(
                        f"{func}: a CPU tensor of shape {tuple(x.shape)} meets tensors on the device ({DEVICE.type}); "
                        "it was created without device= (or moved back to the CPU) where the code needs the inputs' device")
        if to_device:
            kwargs["device"] = torch.device("cpu")
        leaves_out = tree_map(lambda x: x.elem if isinstance(x, OnDevice) else x, (args, kwargs))
        out = func(*leaves_out[0], **leaves_out[1])
        self.ops.add(str(func))
        back_to_cpu = func in _CROSSING and kwargs.get("device") is not None and not to_device
        if back_to_cpu:
            return out
        if func is torch.ops.aten.copy_.default and _plain(args[0]):  # cpu_tensor.copy_(device_tensor)
            return args[0]
        # an in-place op returns its (mutated) input: give back that very wrapper
        inputs = {id(x.elem): x for x in leaves if isinstance(x, OnDevice)}

        def wrap(x):
            if not isinstance(x, torch.Tensor):
                return x
            return inputs[id(x)] if id(x) in inputs else OnDevice(x)

        return tree_map(wrap, out)
