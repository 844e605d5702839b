r"""
# Few-shot image classification on Omniglot (a short configuration)

Omniglot (Lake et al. 2015) is a set of handwritten characters from 50 alphabets; a 5-way
1-shot episode shows one image of each of five new characters and asks for the class of more
images of them. The two minimal background splits ship with hierbayes, so this runs with
nothing to download. We meta-train on the five alphabets of `images_background_small1` (each
character turned by 0/90/180/270 degrees into four classes) and test on the three alphabets of
`images_background_small2` that no training episode has seen.

The recipe is the CPU configuration of `python -m hierbayes omniglot`: the MAML paper's 4-block
convolutional network, $\theta$'s convolutions started from a network pretrained by
cross-entropy on all training classes, and a learned inner step size per weight (Meta-SGD: a
learned diagonal preconditioner, read as a learned diagonal prior covariance).
"""

# %%
# ## Settings
#
# The fast mode pretrains for a few hundred minibatches and meta-trains for a few hundred
# steps, minutes on one core; its accuracy is far below the full configuration's, which
# reaches 90.4 ± 0.2% at 5-way 1-shot over three training seeds in about 20 minutes a seed
# (BENCHMARKS.md §11, on two shared CPU cores).

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import hierbayes
from hierbayes.experiments.omniglot import (
    OmniglotConfig,
    classify,
    pretrain_network,
    pretrained_theta,
)
from hierbayes.inference import GuideConfig
from hierbayes.models import ConvClassifier
from hierbayes.tasks import load_omniglot

FAST = os.environ.get("HIERBAYES_DOCS_FAST", "1") != "0"
PRETRAIN_STEPS, META_STEPS, TEST_EPISODES = (300, 150, 100) if FAST else (5000, 6000, 600)
print(
    f"mode: {'fast' if FAST else 'full'} ({PRETRAIN_STEPS} pretraining minibatches, "
    f"{META_STEPS} meta-steps, {TEST_EPISODES} test episodes)"
)
torch.manual_seed(0)

# %%
# ## Data, pretraining and meta-training

train = load_omniglot("images_background_small1", rotations=True)
test = load_omniglot(
    "images_background_small2", alphabets=["Japanese_(katakana)", "Sanskrit", "Tagalog"]
)
print(f"training: {train.num_classes} classes; test: {test.num_classes} unseen characters")
episodes = train.episodes(ways=5, shots=1, query_shots=2)

model = ConvClassifier(5)
net = pretrain_network(train, OmniglotConfig(pretrain_steps=PRETRAIN_STEPS))
model.theta_init.copy_(pretrained_theta(model, net))
meta_sgd = GuideConfig(
    step_size=0.4, learn_step_size="per_parameter", inner_loss="mean", first_order=True
)
result = hierbayes.fit(
    model,
    episodes,
    meta_steps=META_STEPS,
    meta_batch_size=16,
    guide=meta_sgd,
    dtype=torch.float32,
    progress=False,
)
print(f"meta-training took {result.wall_time:.0f} s")

# %%
# ## Held-out alphabets
#
# A saved run is one file; `classify` reads it back and adapts to each episode's support
# images with 10 inner steps, as the MAML paper tests.

workdir = Path(tempfile.mkdtemp())
result.save(workdir / "omniglot.pt")
heldout = test.episodes(ways=5, shots=1, query_shots=5).sample(
    TEST_EPISODES, generator=torch.Generator().manual_seed(20170306)
)
probs = classify(
    workdir / "omniglot.pt", heldout.support_x, heldout.support_y, heldout.query_x, inner_steps=10
)
correct = (probs.argmax(-1) == heldout.query_y).double().mean(dim=1)  # per episode
ci95 = 1.96 * float(correct.std()) / len(correct) ** 0.5
print(f"5-way 1-shot accuracy on unseen alphabets: {float(correct.mean()):.3f} ± {ci95:.3f}")

# %%
# ## One test episode
#
# Top row: the five support images, one per class. Below: query images with the predicted
# class and its probability (green when right).

j = 0
fig, axes = plt.subplots(3, 5, figsize=(7, 4.6))
for c in range(5):
    axes[0, c].imshow(heldout.support_x[j, c, 0], cmap="gray_r")
    axes[0, c].set_title(f"class {int(heldout.support_y[j, c])}")
for k, ax in enumerate(axes[1:].reshape(-1)):
    p = probs[j, k]
    guess = int(p.argmax())
    ax.imshow(heldout.query_x[j, k, 0], cmap="gray_r")
    right = guess == int(heldout.query_y[j, k])
    ax.set_title(f"{guess} ({float(p[guess]):.2f})", color="green" if right else "red")
for ax in axes.reshape(-1):
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
