"""The composed model, its config and processor.

The classes are imported on first use (``mllm.models.MllmConfig``), so that importing a light
submodule such as `mllm.models.processing_mllm` or the `mllm` command's ``--help`` never pays for
the model code.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mllm.lazy import lazy_attributes

if TYPE_CHECKING:
    from mllm.models.configuration_mllm import MllmConfig
    from mllm.models.modeling_mllm import MllmForConditionalGeneration, MllmPreTrainedModel
    from mllm.models.processing_mllm import MllmProcessor

__all__ = [
    "MllmConfig",
    "MllmForConditionalGeneration",
    "MllmPreTrainedModel",
    "MllmProcessor",
    "register_auto_classes",
    "register_auto_classes_on_import",
]

_LAZY = {
    "MllmConfig": "mllm.models.configuration_mllm",
    "MllmForConditionalGeneration": "mllm.models.modeling_mllm",
    "MllmPreTrainedModel": "mllm.models.modeling_mllm",
    "MllmProcessor": "mllm.models.processing_mllm",
}

# transformers' Auto modules: once one of them is loaded, `model_type="mllm"` is registered.
_AUTO_MODULES = (
    "transformers.models.auto.configuration_auto",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.processing_auto",
)


__getattr__ = lazy_attributes(__name__, _LAZY)


def _is_registered() -> bool:
    configuration_auto = sys.modules.get(_AUTO_MODULES[0])
    return configuration_auto is not None and "mllm" in configuration_auto.CONFIG_MAPPING._extra_content


def register_auto_classes() -> None:
    """Make `AutoConfig`, `AutoModelForImageTextToText` and `AutoProcessor` know `model_type="mllm"`.

    Idempotent: safe to call more than once. Imports the model code (and torch).
    """
    if _is_registered():
        return
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from mllm.models.configuration_mllm import MllmConfig
    from mllm.models.modeling_mllm import MllmForConditionalGeneration
    from mllm.models.processing_mllm import MllmProcessor

    AutoConfig.register("mllm", MllmConfig, exist_ok=True)
    AutoModelForImageTextToText.register(MllmConfig, MllmForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(MllmConfig, MllmProcessor, exist_ok=True)


class _CountingLoader(importlib.abc.Loader):
    """Runs the real loader of a transformers or mllm module inside `_RegisterOnImport`'s count."""

    def __init__(self, loader: importlib.abc.Loader, finder: _RegisterOnImport) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._finder.depth += 1
        try:
            self._loader.exec_module(module)
        finally:
            self._finder.depth -= 1
        self._finder.settled()

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, get_source, ...
        return getattr(self._loader, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers `model_type="mllm"` with the Auto classes once transformers has loaded them.

    `import mllm` stays cheap (no torch), and `import mllm` followed by
    `AutoModelForImageTextToText.from_pretrained(run_dir)` still works. Registration imports the
    model code, so it waits until the outermost import of a transformers or mllm module has
    finished (no half-imported module is touched); then this finder removes itself.
    """

    def __init__(self) -> None:
        self.depth = 0  # transformers / mllm modules being imported right now (nested)
        self._busy = False

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if self._busy or fullname.partition(".")[0] not in ("transformers", "mllm"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _CountingLoader(spec.loader, self)
        return spec

    def settled(self) -> None:
        if self.depth or self._busy or not any(name in sys.modules for name in _AUTO_MODULES):
            return
        self._busy = True
        try:
            register_auto_classes()
        finally:
            self._busy = False
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def register_auto_classes_on_import() -> None:
    """Register now if transformers' Auto classes are loaded already, else once they are."""
    if any(name in sys.modules for name in _AUTO_MODULES):
        register_auto_classes()
        return
    if not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
