"""regionmed: region-aware vision-language pretraining for medical images.

>>> import regionmed
>>> model = regionmed.load("runs/demo/region/model")          # offline, safetensors
>>> pre = regionmed.Preprocessor.from_model(model)
"""

__version__ = "0.1.0"

from .model.clip import RegionMedCLIP, create_model, load  # noqa: E402
from .data.transforms import Preprocessor  # noqa: E402

__all__ = ["RegionMedCLIP", "create_model", "load", "Preprocessor", "__version__"]
