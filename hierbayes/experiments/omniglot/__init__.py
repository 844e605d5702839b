r"""Few-shot classification on real Omniglot characters (Lake et al. 2015; MATH.md §5).

Meta-trains MAML or LLAMA with :class:`~hierbayes.models.ConvClassifier` on the characters of
``images_background_small1`` (five alphabets, 136 characters, each turned by 0/90/180/270
degrees into 544 classes, as Finn et al. 2017), and tests on the alphabets of
``images_background_small2`` that small1 lacks (Japanese_(katakana), Sanskrit, Tagalog: 106
characters no training episode has seen), reporting over a fixed set of test episodes:

* accuracy with a 95% interval over episodes, the query negative log likelihood per point, and
  the expected calibration error (15 equal-width confidence bins; Guo et al. 2017);
* two baselines on the same episodes: **pixel nearest neighbour** (each query takes the label of
  the closest support image in Euclidean pixel distance) and **pretrain + fine-tune** (the same
  network trained by plain minibatch cross-entropy on all 544 training classes, then a new
  linear head fitted on each support set over the frozen features).

LLAMA's probabilities come from the Laplace task posterior :math:`\mathcal N(\hat\phi_j,
\hat H_j^{-1})` (``FitResult.adapt`` then ``predict``); MAML's from its point estimate.

The CPU configuration meta-trains from a **pretrained start** and **learns the inner step
sizes**: :math:`\theta` starts at the convolution weights of the same network trained by
cross-entropy on all 544 training classes (:mod:`~hierbayes.experiments.omniglot.pretrain`;
the pretrain + fine-tune baseline's network, so it is trained once), and each weight gets its own
learned inner step (Meta-SGD; a learned diagonal preconditioner, the diagonal prior covariance
of MATH.md §3). Both are options (``init="random"``, ``learn_step_size="fixed"`` give the MAML
paper's recipe, which the GPU configuration keeps); on the five training alphabets they are
worth about 6 points of 5-way accuracy at equal time (BENCHMARKS §11). Adaptation at test time
takes 10 inner steps, as in the MAML paper.

Training draws episodes with small random shifts of every image (``max_shift`` pixels) as
augmentation; test episodes are never shifted. The run is saved to ``DIR/model.pt``
(:func:`hierbayes.load` reads it back; :func:`classify` classifies new episodes with it).

References: Lake, Salakhutdinov & Tenenbaum (2015); Finn, Abbeel & Levine (2017); Grant et al.
(2018); Guo, Pleiss, Sun & Weinberger (2017), On calibration of modern neural networks.
"""

from hierbayes.experiments.omniglot.command import add_parser, run
from hierbayes.experiments.omniglot.config import (
    EVAL_SEED,
    TEST_ALPHABETS,
    OmniglotConfig,
    ShiftedEpisodes,
    config_for,
    test_episodes,
)
from hierbayes.experiments.omniglot.evaluation import (
    classify,
    evaluate_probs,
    expected_calibration_error,
    load_run,
    pixel_nearest_neighbour,
    pretrain_finetune,
)
from hierbayes.experiments.omniglot.figures import plot_episodes
from hierbayes.experiments.omniglot.pretrain import (
    finetune_head,
    pretrain_network,
    pretrained_theta,
)
from hierbayes.experiments.omniglot.training import choose_prior_scale, format_report, run_omniglot
from hierbayes.inference.curvature.fisher import sampled_fisher_diagonal

__all__ = [
    "EVAL_SEED",
    "TEST_ALPHABETS",
    "OmniglotConfig",
    "ShiftedEpisodes",
    "add_parser",
    "choose_prior_scale",
    "classify",
    "config_for",
    "evaluate_probs",
    "expected_calibration_error",
    "finetune_head",
    "format_report",
    "load_run",
    "pixel_nearest_neighbour",
    "plot_episodes",
    "pretrain_finetune",
    "pretrain_network",
    "pretrained_theta",
    "run",
    "run_omniglot",
    "sampled_fisher_diagonal",
    "test_episodes",
]
