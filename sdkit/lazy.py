"""Lazy exports for the package ``__init__`` files: names are imported from their submodule on first use, so
``import sdkit`` and ``sdkit --help`` stay fast, and ``__dir__`` lists them, so tab-completion in a notebook
shows them before they are imported."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str], eager: dict) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a name to the submodule defining it (relative,
    e.g. ``"samplers.denoisers"``; ``""`` for a submodule that is itself the name); ``eager`` is the package's
    ``globals()``."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{exports[name] or name}")
        value = module if not exports[name] else getattr(module, name)
        eager[name] = value     # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(eager) | set(exports))

    return __getattr__, __dir__
