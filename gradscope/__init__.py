"""gradscope: which layers of your network are not learning, and why.

Two lines in an existing training loop::

    scope = gradscope.watch(model)
    ...
    loss.backward()
    scope.step()          # statistics, alerts with remedies
    optimizer.step()

Data flows one way: collect (hooks, :mod:`gradscope.collect`) -> statistics (:mod:`gradscope.stats`) -> detectors
(:mod:`gradscope.detectors`) -> records (:mod:`gradscope.record`) -> rendering (:mod:`gradscope.render`).
"""

from .alerts import Alert, GradientError
from .audit import AuditReport, audit
from .detectors import DeadUnits, Exploding, Nonfinite, Saturation, ThroughTime, Vanishing, default_detectors
from .record import History, Run, StepRecord, load
from .options import EXTRA_STATS
from .scope import Scope, watch
from .integrations.tensorboard import TensorBoardLogger

__version__ = "0.1.0"

__all__ = ["watch", "audit", "load", "Scope", "Run", "AuditReport", "StepRecord", "History", "Alert", "GradientError",
           "Vanishing", "Exploding", "Nonfinite", "DeadUnits", "Saturation", "ThroughTime", "default_detectors",
           "EXTRA_STATS", "TensorBoardLogger", "__version__"]
