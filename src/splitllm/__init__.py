"""splitllm: collaborative (split) inference of LLMs between a server and its clients."""

from __future__ import annotations

from splitllm.placement import Placement

__all__ = ["Placement", "connect"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The runtime pulls in torch; import it only when a program asks for it.
    if name == "connect":
        from splitllm.runtime.client import connect

        return connect
    raise AttributeError(name)
