r"""The linear-Gaussian experiment: the paper's theorem made executable (MATH.md §3).

``python -m hierbayes linear --out DIR`` runs three parts and writes ``DIR/metrics.json``,
``DIR/gd_paths.png`` and ``DIR/theta_recovery.png``:

1. **Equivalence battery.** On random linear tasks (over-determined, under-determined and
   rank-deficient inputs; no, diagonal and full preconditioners; random :math:`k`, admissible
   :math:`\alpha` and :math:`\sigma`), the :math:`k`-step gradient-descent iterate from
   :math:`\theta` is compared with the MAP estimate under the implied prior
   :math:`\mathcal N(\theta, Q)` (Santos 1996; Grant et al. 2018, §3.1). The largest
   discrepancy is float64 rounding.
2. **Gradient-descent paths in 2-D** for :math:`k = 1, 3, 10`: the path from :math:`\theta`
   over the contours of the likelihood and of the implied prior, ending on the MAP.
3. **Empirical Bayes recovers the truth.** :math:`J` tasks are simulated from a known
   :math:`\theta^*` (:math:`\phi_j\sim\mathcal N(\theta^*, s^2I)`); :math:`\hat\theta` from
   exact evidence maximisation (closed form, all of a task's points) and from MAML (closed
   form, and :func:`~hierbayes.inference.training.fit` on the built-in linear model) approaches
   :math:`\theta^*` like :math:`1/\sqrt J`, as its exact sampling covariance predicts.

Modules: :mod:`~hierbayes.experiments.linear.equivalence` (part 1),
:mod:`~hierbayes.experiments.linear.figures` (part 2 and the figure of part 3),
:mod:`~hierbayes.experiments.linear.recovery` (part 3),
:mod:`~hierbayes.experiments.linear.config` (the settings) and
:mod:`~hierbayes.experiments.linear.command` (the command line).
"""

from hierbayes.experiments.linear.command import add_parser, format_report, run, run_linear
from hierbayes.experiments.linear.config import LinearConfig
from hierbayes.experiments.linear.equivalence import equivalence_battery
from hierbayes.experiments.linear.figures import plot_gd_paths, plot_theta_recovery
from hierbayes.experiments.linear.recovery import simulate_tasks, theta_recovery

__all__ = [
    "LinearConfig",
    "add_parser",
    "equivalence_battery",
    "format_report",
    "plot_gd_paths",
    "plot_theta_recovery",
    "run",
    "run_linear",
    "simulate_tasks",
    "theta_recovery",
]
