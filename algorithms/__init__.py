"""Federated-learning methods, one module each. Importing the package registers them all."""
import importlib
import pkgutil

from .base import Algorithm, ConfigError, Payload, Reply, algorithm_names, get_algorithm, register

_SUPPORT = {"base", "common", "bitpack", "quantizers", "lowrank", "harness"}
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _SUPPORT and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Algorithm", "ConfigError", "Payload", "Reply", "algorithm_names", "get_algorithm", "register"]
