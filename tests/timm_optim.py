"""timm's optimizer modules without timm's package: ``import timm`` needs torchvision, which has no CPU wheel here, and
timm/optim/lamb.py and lars.py need only torch and their helper modules beside them."""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

import pytest

PACKAGE = "_timm_optim_standalone"


def load(module: str) -> Any:
    """timm/optim/{module}.py, loaded once as ``_timm_optim_standalone.{module}`` (its relative imports of timm's
    helpers resolve in the same folder); skips the test when timm is not installed."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm is not installed")
    folder = spec.submodule_search_locations[0] + "/optim"
    package = types.ModuleType(PACKAGE)
    package.__path__ = [folder]
    sys.modules.setdefault(PACKAGE, package)
    name = f"{PACKAGE}.{module}"
    if name not in sys.modules:
        module_spec = importlib.util.spec_from_file_location(name, f"{folder}/{module}.py")
        loaded = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = loaded
        module_spec.loader.exec_module(loaded)
    return sys.modules[name]
