"""A package's public names, each imported from its module on first use (PEP 562).

``import openai_miner`` (``--version``) and ``import openai_miner.testing`` then cost no
bittensor, uvicorn or LangChain import, seconds on a small machine, until a name is used.
"""

import sys
from importlib import import_module
from typing import Any, Callable, Mapping


def exports(package: str, homes: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``, whose name ``n`` lives in ``homes[n]``."""
    namespace = vars(sys.modules[package])

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(home), name)
        namespace[name] = value  # once: later lookups never come here
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *homes})

    return __getattr__, __dir__
