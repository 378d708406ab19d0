"""Training objectives: the loss of one client's rows, which input paths it needs, and how its per-slice
statistics merge. The server's step, an unsplit client's step and a label-private client's head all call
:func:`get_objective` (``--loss NAME``), so a new loss is one function and one registration.

Built in: ``ce`` (token-mean cross-entropy, base path only), ``lesft`` (the LESFT token-weighted loss,
base + reference paths, see :mod:`lesft.loss`), and two token-weighting baselines on the base path, each in
its own module: ``dft`` (:mod:`lesft.objectives.dft`) and ``rho1`` (:mod:`lesft.objectives.rho1`).

Add one from outside the package (trl-style: a function of the logits and labels)::

    from lesft.objectives import register_objective

    @register_objective("focal", needs_reference=False)
    def focal(batch, cfg):
        ...  # batch.logits [B, T, V], batch.labels [B, T] (-100 = ignored)
        return loss, {"mean_p": ...}      # a scalar and per-slice statistics (floats)

and train with ``--loss focal`` (with ``--paths base``, or ``dual`` when ``needs_reference=True``).
"""

from lesft.objectives.registry import (OBJECTIVES, LossFn, MergeFn, Objective, ObjectiveBatch, SliceLoss,  # noqa: F401
                                       get_objective, register_objective, token_mean_stats)
from lesft.objectives import builtin, dft, rho1  # noqa: E402,F401  (each registers its objectives on import)

__all__ = ["OBJECTIVES", "Objective", "ObjectiveBatch", "SliceLoss", "get_objective", "register_objective",
           "token_mean_stats"]
