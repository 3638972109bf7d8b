"""Methods registry: the CLI's ``--method`` choices."""

from .adm import ADM
from .adp import ADP
from .base import Context, Method, Pairs, Phase
from .dmd import DMD
from .dmd2 import DMD2
from .dmdx import DMDX
from .dsm import DSM
from .gdd import GDD
from .sid import SiD
from .vsd import VSD

METHODS: dict[str, type[Method]] = {"dmd": DMD, "dmd2": DMD2, "adm": ADM, "adp": ADP, "dmdx": DMDX, "sid": SiD,
                                   "vsd": VSD, "gdd": GDD}
ALL_METHODS: dict[str, type[Method]] = {**METHODS, "dsm": DSM}


def get_method(name: str) -> type[Method]:
    if name not in ALL_METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return ALL_METHODS[name]


__all__ = ["METHODS", "ALL_METHODS", "get_method", "Context", "Method", "Pairs", "Phase"]
