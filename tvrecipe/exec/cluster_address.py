"""Cluster addresses (``--cluster``) and the Dask import, without importing torch: the command
line checks them before anything runs (see :mod:`tvrecipe.exec.cluster`)."""

from __future__ import annotations

import re
from typing import Any

from tvrecipe.errors import MissingPackage

__all__ = ["ADDRESS_FORMS", "parse_address", "require_dask"]

_ADDRESS = re.compile(r"^(?:local:(?P<n>[1-9]\d*)|tcp://(?P<host>[^\s:/\[\]]+|\[[0-9a-fA-F:]+\]):"
                      r"(?P<port>\d{1,5}))$")
ADDRESS_FORMS = ("tcp://HOST:PORT (a running Dask scheduler) or local:N (a cluster of N worker "
                 "processes on this machine)")


def parse_address(text: str) -> tuple[str, Any]:
    """``("local", N)`` or ``("tcp", "tcp://host:port")``.

    Raises:
        ValueError: any other form (the message names the two accepted ones).
    """
    m = _ADDRESS.match(text.strip())
    if m is None or (m.group("port") and int(m.group("port")) > 65535):
        raise ValueError(f"{text!r} is no cluster address: use {ADDRESS_FORMS}")
    if m.group("n"):
        return "local", int(m.group("n"))
    return "tcp", text.strip()


def require_dask() -> Any:
    """The ``distributed`` module.

    Raises:
        MissingPackage: Dask distributed is not installed.
    """
    try:
        import distributed
    except ImportError:
        raise MissingPackage("--cluster needs Dask distributed, which is not installed: "
                             "pip install 'tvrecipe[cluster]'") from None
    return distributed
