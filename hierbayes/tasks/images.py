r"""Few-shot image datasets: Omniglot and the miniImageNet layouts, as labelled image tensors.

Every loader returns an :class:`ImageDataset`: ``images`` ``(M, C, H, W)`` floats in ``[0, 1]``
and integer ``labels`` ``(M,)``, which :class:`~hierbayes.tasks.EpisodicSampler` takes as they
are (``dataset.episodes(ways=5, shots=1)``).

* **Omniglot** (Lake et al. 2015) in the release's own layout
  ``<split>/<alphabet>/<character>/*.png``, from a folder or the release zip, each character a
  class. Images are resized to ``28 x 28`` (Lanczos, as Finn et al. 2017) and inverted so that
  ink is 1 and paper 0. ``rotations=True`` adds the character turned by 90, 180 and 270 degrees
  as three further classes (Santoro et al. 2016; Finn et al. 2017). Two small background splits
  ship with hierbayes (:func:`bundled_omniglot`).
* **miniImageNet** (Vinyals et al. 2016; Ravi & Larochelle 2017) as users commonly have it:
  a folder of class folders of images (:func:`load_image_folder`), or the pickled split
  dictionaries ``{"image_data": (M, 84, 84, 3) uint8, "class_dict": {name: [indices]}}`` of
  ``mini-imagenet-cache-{train,val,test}.pkl`` (:func:`load_pickled_split`).

References: Lake, Salakhutdinov & Tenenbaum (2015), Science 350; Vinyals et al. (2016),
Matching networks for one shot learning; Santoro et al. (2016), Meta-learning with
memory-augmented neural networks; Finn, Abbeel & Levine (2017); Ravi & Larochelle (2017).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import Tensor

from hierbayes.errors import TaskDataError
from hierbayes.tasks.episodic import EpisodicSampler

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageDataset",
    "bundled_omniglot",
    "load_image_folder",
    "load_omniglot",
    "load_pickled_split",
]

#: File suffixes read as images (lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclass(frozen=True)
class ImageDataset:
    r"""Labelled images for episodic few-shot learning.

    Parameters
    ----------
    images:
        ``(M, C, H, W)`` floating-point images in ``[0, 1]``.
    labels:
        ``(M,)`` integer classes ``0..K-1``, ordered as ``class_names``.
    class_names:
        ``K`` names; Omniglot's are ``"<alphabet>/<character>"`` with ``"/rot90"`` (180, 270)
        for a rotated copy.
    """

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def episodes(self, *, ways: int, shots: int, query_shots: int = 15) -> EpisodicSampler:
        """An :class:`~hierbayes.tasks.EpisodicSampler` of ``ways``-way ``shots``-shot episodes."""
        return EpisodicSampler(
            self.images, self.labels, ways=ways, shots=shots, query_shots=query_shots
        )

    def select_classes(self, keep: Sequence[int]) -> ImageDataset:
        """The images of classes ``keep`` only, relabelled ``0..len(keep)-1`` in that order."""
        index = torch.as_tensor(list(keep), dtype=torch.long)
        remap = torch.full((self.num_classes,), -1, dtype=torch.long)
        remap[index] = torch.arange(len(index))
        new = remap[self.labels]
        rows = new >= 0
        return ImageDataset(
            self.images[rows], new[rows], tuple(self.class_names[i] for i in index.tolist())
        )


# -- Omniglot ----------------------------------------------------------------------------------


def bundled_omniglot(split: str = "images_background_small1") -> Path:
    """The path of an Omniglot zip that ships with hierbayes: ``"images_background_small1"``
    (Balinese, Early_Aramaic, Greek, Korean, Latin) or ``"images_background_small2"`` (Greek,
    Japanese_(katakana), Latin, Sanskrit, Tagalog); ``"small1"``/``"small2"`` for short."""
    names = {
        "small1": "images_background_small1",
        "small2": "images_background_small2",
    }
    name = names.get(split, split)
    if name not in names.values():
        raise ValueError(f"unknown bundled Omniglot split {split!r}; known: {sorted(names)}")
    path = Path(str(resources.files("hierbayes") / "data" / "omniglot" / f"{name}.zip"))
    if not path.is_file():
        raise FileNotFoundError(f"the bundled Omniglot split {path} is missing from the install")
    return path


def _decode(data: bytes | Path, size: tuple[int, int], mode: str) -> np.ndarray:
    from PIL import Image

    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(source) as img:
        converted = img.convert(mode)
        if converted.size != (size[1], size[0]):
            converted = converted.resize((size[1], size[0]), Image.Resampling.LANCZOS)
        return np.asarray(converted, dtype=np.uint8)


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _omniglot_files(
    source: Path,
) -> tuple[dict[tuple[str, str], list[str]], zipfile.ZipFile | None]:
    """``{(alphabet, character): [file, ...]}`` of a release folder or zip (sorted)."""
    groups: dict[tuple[str, str], list[str]] = {}
    archive: zipfile.ZipFile | None = None
    if source.is_dir():
        names = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
    elif zipfile.is_zipfile(source):
        archive = zipfile.ZipFile(source)
        names = [n for n in archive.namelist() if not n.endswith("/")]
    else:
        raise FileNotFoundError(f"{source} is neither a folder nor a zip file")
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) < 3 or not _is_image(name) or any(p.startswith(".") for p in parts):
            continue
        groups.setdefault((parts[-3], parts[-2]), []).append(name)
    if not groups:
        raise TaskDataError(
            f"{source} holds no images in the Omniglot layout "
            "<split>/<alphabet>/<character>/*.png (or <alphabet>/<character>/*.png)"
        )
    return {k: sorted(v) for k, v in sorted(groups.items())}, archive


def load_omniglot(
    source: str | Path = "images_background_small1",
    *,
    alphabets: Iterable[str] | None = None,
    exclude_alphabets: Iterable[str] = (),
    rotations: bool = False,
    size: int = 28,
    invert: bool = True,
) -> ImageDataset:
    r"""Omniglot characters as classes, ``(M, 1, size, size)`` images in ``[0, 1]``.

    Parameters
    ----------
    source:
        A folder or zip in the release layout ``<split>/<alphabet>/<character>/*.png``, or the
        name of a bundled split (:func:`bundled_omniglot`).
    alphabets, exclude_alphabets:
        Keep only these alphabets (folder names, e.g. ``"Japanese_(katakana)"``); drop those.
    rotations:
        Add each character rotated by 90, 180 and 270 degrees as three more classes (so
        ``4 x`` the classes), as Finn et al. (2017) augment the training alphabets.
    size:
        Side of the resized images (28 in the MAML paper).
    invert:
        Ink 1, paper 0 (the release's PNGs are black on white).

    Notes
    -----
    Classes are ordered by alphabet, then character, then rotation; images of one class by file
    name (one per drawer).
    """
    path = Path(source)
    if not path.exists() and str(source) in (
        "small1",
        "small2",
        "images_background_small1",
        "images_background_small2",
    ):
        path = bundled_omniglot(str(source))
    groups, archive = _omniglot_files(path)
    available = sorted({a for a, _ in groups})
    wanted = set(available if alphabets is None else alphabets) - set(exclude_alphabets)
    missing = wanted - set(available)
    if missing:
        raise TaskDataError(f"alphabets {sorted(missing)} are not in {path}; it holds {available}")
    images: list[np.ndarray] = []
    labels: list[int] = []
    names: list[str] = []
    turns = (0, 1, 2, 3) if rotations else (0,)
    try:
        for (alphabet, character), files in groups.items():
            if alphabet not in wanted:
                continue
            pixels = np.stack(
                [
                    _decode(archive.read(f) if archive is not None else path / f, (size, size), "L")
                    for f in files
                ]
            )
            for k in turns:
                labels.extend([len(names)] * len(files))
                names.append(f"{alphabet}/{character}" + (f"/rot{90 * k}" if k else ""))
                images.append(np.rot90(pixels, k, axes=(1, 2)))
    finally:
        if archive is not None:
            archive.close()
    if not images:
        raise TaskDataError(f"no characters left in {path} after selecting alphabets")
    x = torch.from_numpy(np.ascontiguousarray(np.concatenate(images))).to(torch.float32) / 255.0
    if invert:
        x = 1.0 - x
    return ImageDataset(x.unsqueeze(1), torch.as_tensor(labels, dtype=torch.long), tuple(names))


# -- miniImageNet layouts ---------------------------------------------------------------------


def _to_chw(pixels: np.ndarray) -> Tensor:
    """``(M, H, W[, C])`` uint8 to ``(M, C, H, W)`` floats in ``[0, 1]``."""
    x = torch.from_numpy(np.ascontiguousarray(pixels))
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    return x.permute(0, 3, 1, 2).to(torch.float32) / 255.0


def load_image_folder(
    root: str | Path,
    *,
    size: int | tuple[int, int] = 84,
    grayscale: bool = False,
    classes: Iterable[str] | None = None,
) -> ImageDataset:
    r"""A folder of class folders (``root/<class>/<image>``, as torchvision's ``ImageFolder``
    and the miniImageNet split folders ``train/``, ``val/``, ``test/``) resized to ``size``.

    Returns ``(M, 3, H, W)`` RGB images (``(M, 1, H, W)`` with ``grayscale``) in ``[0, 1]``;
    classes in sorted order of folder name, or the order of ``classes``.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"{base} is not a folder")
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    folders = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = folders if classes is None else list(classes)
    missing = set(names) - set(folders)
    if missing:
        raise TaskDataError(f"classes {sorted(missing)} are not folders of {base}")
    pixels: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        files = sorted(p for p in (base / name).iterdir() if p.is_file() and _is_image(p.name))
        if not files:
            raise TaskDataError(f"class folder {base / name} holds no images ({IMAGE_SUFFIXES})")
        pixels.extend(_decode(f, hw, "L" if grayscale else "RGB") for f in files)
        labels.extend([label] * len(files))
    if not names:
        raise TaskDataError(f"{base} has no class folders")
    return ImageDataset(
        _to_chw(np.stack(pixels)), torch.as_tensor(labels, dtype=torch.long), tuple(names)
    )


def load_pickled_split(path: str | Path) -> ImageDataset:
    r"""A pickled miniImageNet split (``mini-imagenet-cache-train.pkl`` and the like): a dict
    with ``image_data`` ``(M, H, W, 3)`` uint8 and ``class_dict`` ``{name: [row, ...]}``.

    Unpickling runs code from the file: load only files you trust. Classes are in sorted order
    of name; rows that no class lists are dropped.
    """
    with open(path, "rb") as fh:
        data = pickle.load(fh)  # the documented format of these files
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
        raise TaskDataError(
            f"{path} is not a miniImageNet split: expected a dict with 'image_data' and "
            f"'class_dict'; got {type(data).__name__}"
            + (f" with keys {sorted(data)}" if isinstance(data, dict) else "")
        )
    pixels = np.asarray(data["image_data"])
    if pixels.ndim != 4 or pixels.dtype != np.uint8:
        raise TaskDataError(
            f"{path}: image_data must be (M, H, W, C) uint8; got {pixels.shape} {pixels.dtype}"
        )
    names = sorted(data["class_dict"])
    rows: list[int] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        members = [int(i) for i in data["class_dict"][name]]
        bad = [i for i in members if not 0 <= i < pixels.shape[0]]
        if bad:
            raise TaskDataError(
                f"{path}: class {name!r} lists row {bad[0]} but image_data has {pixels.shape[0]}"
            )
        rows.extend(members)
        labels.extend([label] * len(members))
    return ImageDataset(
        _to_chw(pixels[rows]), torch.as_tensor(labels, dtype=torch.long), tuple(names)
    )
