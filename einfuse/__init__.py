"""einfuse: compiler-style fusion passes for PyTorch, recognised by what they compute.

    model = einfuse.optimize(model)                      # or @einfuse.optimize
    model = torch.compile(model, backend="einfuse")      # the Dynamo backend
    report = einfuse.inspect(model, *example_inputs)     # offline: what was fused and why
"""

from einfuse.api import inspect, optimize
from einfuse.capture.backend import einfuse_backend, last_report
from einfuse.config import OptimizeConfig
from einfuse.report import Region, Report
from einfuse.runtime import counters

__all__ = ["optimize", "inspect", "OptimizeConfig", "Report", "Region", "einfuse_backend", "last_report", "counters"]
__version__ = "0.1.0"
