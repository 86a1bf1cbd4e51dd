"""gradscope: which layers of your network are not learning, and why.

Two lines in an existing training loop::

    scope = gradscope.watch(model)
    ...
    loss.backward()
    scope.step()          # statistics, alerts with remedies
    optimizer.step()

Data flows one way: hooks fill per-step buffers (:mod:`gradscope.collect`) -> a pure function builds the step record
(:mod:`gradscope.build`, reading the statistics registry :mod:`gradscope.statistics`; ranks reduced by
:mod:`gradscope.distributed`) -> detectors (:mod:`gradscope.detectors`) -> history and the run API
(:mod:`gradscope.record`, :mod:`gradscope.run`) -> rendering (:mod:`gradscope.render`, :mod:`gradscope.figures`,
:mod:`gradscope.report`). :class:`Scope` (:mod:`gradscope.scope`) owns the lifecycle and orchestrates.

The names here are what a training script uses: attach (:func:`watch`, :func:`audit`), read (:class:`Run`,
:func:`load`), and tune the alerts (the detectors). Everything else lives in its module: the record types in
:mod:`gradscope.record`, the statistics in :mod:`gradscope.statistics`, the loggers in :mod:`gradscope.integrations`.
"""

from .alerts import Alert, GradientError
from .audit import audit
from .detectors import DeadUnits, Exploding, Nonfinite, Saturation, ThroughTime, Vanishing, default_detectors
from .run import Run, load
from .scope import Scope, watch

__version__ = "0.1.0"

__all__ = ["watch", "audit", "load", "Scope", "Run", "Alert", "GradientError",
           "Vanishing", "Exploding", "Nonfinite", "DeadUnits", "Saturation", "ThroughTime", "default_detectors"]
