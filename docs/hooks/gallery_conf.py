"""mkdocs-gallery's configuration: what is reset between two tutorials.

Each tutorial runs in the build's own process. A tutorial that sets torch's default dtype
(the grouped-data ones work in float64) or fills Pyro's parameter store must not change the
next one, so both are restored after every tutorial, as matplotlib is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def reset_hierbayes_state(gallery_conf: dict[str, Any], file: Path | None) -> None:
    """Restore torch's default dtype and clear Pyro's parameter store."""
    import pyro
    import torch

    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    pyro.clear_param_store()


conf = {"reset_modules": ("matplotlib", reset_hierbayes_state)}
