"""regionmed: region-aware vision-language pretraining for medical images."""

__version__ = "0.1.0"
