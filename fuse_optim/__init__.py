"""fuse_optim: FUSE and FUSE-PV (arXiv 2503.04204) as torch optimizers.

Imports torch only. See :class:`FusePV` (Adam, then L-BFGS once a switch criterion fires) and
:class:`Fuse` (both updates blended by a theta schedule).
"""

from __future__ import annotations

from . import line_search, schedules, switch
from .fuse import ADAM, LBFGS, Fuse, FusePV, StepInfo
from .lbfgs import LBFGSMemory
from .switch import make_criterion

__all__ = ["Fuse", "FusePV", "StepInfo", "LBFGSMemory", "make_criterion", "switch", "schedules",
           "line_search", "ADAM", "LBFGS"]
__version__ = "0.1.0"
