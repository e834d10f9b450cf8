"""rectrain: distributed training of recommendation models on TorchRec."""

__version__ = "0.1.0"
