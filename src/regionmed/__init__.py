"""regionmed: region-aware vision-language pretraining for medical images.

>>> import regionmed
>>> model = regionmed.load("runs/demo/region/model")          # offline, safetensors
>>> pre = regionmed.Preprocessor.from_model(model)

The model-side names are imported on first use, so tools that need no torch
(the dataset builder, ``regionmed --help``) start fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "RegionMedCLIP": ("regionmed.model.clip", "RegionMedCLIP"),
    "create_model": ("regionmed.model.clip", "create_model"),
    "load": ("regionmed.model.clip", "load"),
    "Preprocessor": ("regionmed.data.transforms", "Preprocessor"),
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'regionmed' has no attribute {name!r}")
