"""Converters from a MiniCPM-V 4.6 Hugging Face checkpoint to edge artifacts."""

from .checkpoint import Checkpoint
from .errors import ConvertError
from .spec import ModelSpec

__all__ = ["Checkpoint", "ConvertError", "ModelSpec"]
