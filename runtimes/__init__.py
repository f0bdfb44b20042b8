"""Inference runtimes behind one interface (see `runtimes.base`); each is imported lazily."""

from .base import RUNTIMES, Runtime, RuntimeUnavailableError, load_runtime, runtime_class

__all__ = ["RUNTIMES", "Runtime", "RuntimeUnavailableError", "load_runtime", "runtime_class"]
