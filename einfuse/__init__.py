"""einfuse: compiler-style fusion passes for PyTorch, recognised by what they compute.

    model = einfuse.optimize(model)                      # or @einfuse.optimize
    model = torch.compile(model, backend="einfuse")      # the Dynamo backend
    report = einfuse.inspect(model, *example_inputs)     # offline: what was fused and why
"""

import logging as _logging
import os as _os

from einfuse.api import InputMismatchError, inspect, optimize
from einfuse.calibrate import calibrate
from einfuse.passes.layer_skip import layers_for_speedup
from einfuse.capture import compile_stats
from einfuse.capture.backend import einfuse_backend, last_report
from einfuse.config import OptimizeConfig
from einfuse.report import Region, Report
from einfuse.runtime import counters

__all__ = ["optimize", "inspect", "OptimizeConfig", "Report", "Region", "einfuse_backend", "last_report", "counters",
           "calibrate", "layers_for_speedup", "InputMismatchError", "compile_stats"]
__version__ = "0.1.0"


def _configure_logging() -> None:
    """EINFUSE_LOG=debug|info shows each pass, each match and each rejected candidate with its reason."""
    level = _os.environ.get("EINFUSE_LOG")
    if not level:
        return
    logger = _logging.getLogger("einfuse")
    logger.setLevel(level.upper())
    if not logger.handlers:
        h = _logging.StreamHandler()
        h.setFormatter(_logging.Formatter("[einfuse %(levelname)s] %(message)s"))
        logger.addHandler(h)


_configure_logging()
