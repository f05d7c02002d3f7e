"""Export targets: runtimes a pruned model is written for. Registered explicitly, by name.

    from mosaic_export.targets import get
    get("gguf").alignment("Q4_K_M")  # 256

A new target subclasses ``base.Target`` and calls ``register`` once; the CLI's choices, profile
validation, the cost model, the pipeline and the deployable folder then offer it.
"""

from __future__ import annotations

from mosaic_export.core.errors import UserError
from mosaic_export.targets.base import Target
from mosaic_export.targets.gguf.target import GGUF
from mosaic_export.targets.onnx.target import ONNX

_REGISTRY: dict[str, Target] = {}
_TYPE_OPTIONS = ("quant", "dtype")  # the CLI options (and profile keys) that name a type


def register(target: Target) -> Target:
    """Add a target; checked here, so that a malformed one fails where it is registered."""
    name = getattr(target, "name", None)
    if not isinstance(target, Target) or not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"cannot register {target!r}: expected a Target with an identifier as name")
    if name in _REGISTRY or name == "none":
        raise ValueError(f"target '{name}' is already registered" if name != "none"
                         else "'none' is the CLI's word for no target")
    if target.option not in _TYPE_OPTIONS:
        raise ValueError(f"target '{name}': option must be one of {_TYPE_OPTIONS}, got {target.option!r}")
    if not target.types or target.default_type not in target.types or \
            not set(target.search_types) <= set(target.types):
        raise ValueError(f"target '{name}': default_type and search_types must be among its types")
    unknown = set(target.profile_keys) - {"execution_provider"}
    if unknown:
        raise ValueError(f"target '{name}': profile keys {sorted(unknown)} are not [runtime] keys")
    _REGISTRY[name] = target
    return target


def unregister(name: str) -> None:
    """Remove a target (tests that register their own)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Target:
    if name not in _REGISTRY:
        raise UserError(f"target '{name}' is not supported; supported: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def registered() -> tuple[Target, ...]:
    return tuple(_REGISTRY.values())


def _register_builtins() -> None:
    register(GGUF())
    register(ONNX())


_register_builtins()
