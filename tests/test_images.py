"""Image loaders on tiny synthetic image sets: Omniglot (folder and zip), class folders, the
pickled miniImageNet splits, and the episodes drawn from them."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hierbayes.errors import TaskDataError
from hierbayes.tasks import (
    EpisodicSampler,
    ImageDataset,
    load_image_folder,
    load_omniglot,
    load_pickled_split,
)

ALPHABETS = {"Alpha": 3, "Beta": 2}  # characters per alphabet
DRAWERS = 4


def _glyph(alphabet: int, character: int, drawer: int, size: int = 35) -> np.ndarray:
    """A black-on-white image whose ink pattern identifies the class (asymmetric, so each
    rotation differs) with one drawer-dependent pixel."""
    img = np.full((size, size), 255, dtype=np.uint8)
    img[5 : 10 + 5 * character, 4 + 6 * alphabet : 8 + 6 * alphabet] = 0
    img[3, 3 + 7 * character] = 0
    img[size - 2, drawer] = 0
    return img


def _write_omniglot(root: Path) -> None:
    for a, (alphabet, count) in enumerate(ALPHABETS.items()):
        for c in range(count):
            folder = root / "images_background_tiny" / alphabet / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for d in range(DRAWERS):
                Image.fromarray(_glyph(a, c, d)).save(folder / f"{c:04d}_{d + 1:02d}.png")


@pytest.fixture
def omniglot_folder(tmp_path: Path) -> Path:
    _write_omniglot(tmp_path)
    return tmp_path / "images_background_tiny"


@pytest.fixture
def omniglot_zip(omniglot_folder: Path, tmp_path: Path) -> Path:
    path = tmp_path / "images_background_tiny.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(omniglot_folder.rglob("*.png")):
            archive.write(file, file.relative_to(omniglot_folder.parent).as_posix())
    return path


def test_omniglot_folder_shapes_labels_and_resizing(omniglot_folder: Path) -> None:
    data = load_omniglot(omniglot_folder, size=28)
    assert data.images.shape == (5 * DRAWERS, 1, 28, 28)
    assert data.images.dtype == torch.float32
    assert data.num_classes == 5
    assert data.class_names[0] == "Alpha/character01"
    assert torch.equal(torch.bincount(data.labels), torch.full((5,), DRAWERS))
    # inverted: paper 0, ink near 1
    assert data.images.min() >= 0 and data.images.max() <= 1
    assert float(data.images[:, :, 0, -1].max()) < 0.05
    assert float(data.images.amax(dim=(1, 2, 3)).min()) > 0.5
    raw = load_omniglot(omniglot_folder, size=35, invert=False)
    expected = torch.from_numpy(_glyph(0, 0, 0)).float() / 255
    torch.testing.assert_close(raw.images[0, 0], expected, rtol=0, atol=0)


def test_omniglot_zip_equals_folder(omniglot_folder: Path, omniglot_zip: Path) -> None:
    a = load_omniglot(omniglot_folder)
    b = load_omniglot(omniglot_zip)
    assert a.class_names == b.class_names
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert torch.equal(a.labels, b.labels)


def test_omniglot_rotations_are_extra_classes(omniglot_zip: Path) -> None:
    plain = load_omniglot(omniglot_zip, size=20)
    turned = load_omniglot(omniglot_zip, size=20, rotations=True)
    assert turned.num_classes == 4 * plain.num_classes
    assert len(turned) == 4 * len(plain)
    assert turned.class_names[:4] == (
        "Alpha/character01",
        "Alpha/character01/rot90",
        "Alpha/character01/rot180",
        "Alpha/character01/rot270",
    )
    first = plain.images[plain.labels == 0]
    for k in range(4):
        torch.testing.assert_close(
            turned.images[turned.labels == k], torch.rot90(first, k, dims=(2, 3))
        )
    assert not torch.equal(turned.images[turned.labels == 1], first)


def test_omniglot_alphabet_selection(omniglot_zip: Path) -> None:
    beta = load_omniglot(omniglot_zip, alphabets=["Beta"])
    assert beta.num_classes == 2
    assert all(name.startswith("Beta/") for name in beta.class_names)
    assert load_omniglot(omniglot_zip, exclude_alphabets=["Beta"]).num_classes == 3
    with pytest.raises(TaskDataError, match="Gamma"):
        load_omniglot(omniglot_zip, alphabets=["Gamma"])


def test_a_folder_without_the_layout_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskDataError, match="layout"):
        load_omniglot(tmp_path / "empty")


def test_episodes_balanced_disjoint_and_reproducible(omniglot_zip: Path) -> None:
    data = load_omniglot(omniglot_zip, rotations=True)
    sampler = data.episodes(ways=3, shots=1, query_shots=2)
    assert isinstance(sampler, EpisodicSampler)
    batch = sampler.sample(6, generator=torch.Generator().manual_seed(1))
    again = sampler.sample(6, generator=torch.Generator().manual_seed(1))
    other = sampler.sample(6, generator=torch.Generator().manual_seed(2))
    assert batch.support_x.shape == (6, 3, 1, 28, 28)
    assert batch.query_x is not None and batch.query_x.shape == (6, 6, 1, 28, 28)
    torch.testing.assert_close(batch.support_x, again.support_x, rtol=0, atol=0)
    assert not torch.equal(batch.support_x, other.support_x)
    assert torch.equal(batch.support_y[0], torch.tensor([0, 1, 2]))
    assert batch.query_y is not None
    assert torch.equal(torch.bincount(batch.query_y[0]), torch.tensor([2, 2, 2]))
    # support and query images of a task are different drawings
    flat_s = batch.support_x.flatten(2)
    flat_q = batch.query_x.flatten(2)
    for t in range(6):
        assert (torch.cdist(flat_q[t], flat_s[t]).min() > 0).item()
        classes = batch.info["classes"][t]
        assert len(set(classes.tolist())) == 3


def test_select_classes_relabels(omniglot_zip: Path) -> None:
    data = load_omniglot(omniglot_zip)
    sub = data.select_classes([4, 1])
    assert sub.class_names == (data.class_names[4], data.class_names[1])
    assert torch.equal(torch.bincount(sub.labels), torch.tensor([DRAWERS, DRAWERS]))
    torch.testing.assert_close(sub.images[sub.labels == 0], data.images[data.labels == 4])


def _write_class_folders(root: Path, classes: int = 3, per_class: int = 4) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"n0{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i}.png")


def test_class_folders_rgb_and_grayscale(tmp_path: Path) -> None:
    _write_class_folders(tmp_path)
    rgb = load_image_folder(tmp_path, size=(10, 12))
    assert rgb.images.shape == (12, 3, 10, 12)
    assert rgb.class_names == ("n00", "n01", "n02")
    first = np.array(Image.open(tmp_path / "n00" / "img0.png"))
    torch.testing.assert_close(
        rgb.images[0], torch.from_numpy(first).permute(2, 0, 1).float() / 255
    )
    gray = load_image_folder(tmp_path, size=8, grayscale=True, classes=["n02", "n00"])
    assert gray.images.shape == (8, 1, 8, 8)
    assert gray.class_names == ("n02", "n00")
    episodes = rgb.episodes(ways=2, shots=2, query_shots=2).sample(3)
    assert episodes.support_x.shape == (3, 4, 3, 10, 12)


def test_pickled_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (9, 6, 6, 3), dtype=np.uint8)
    path = tmp_path / "mini-imagenet-cache-val.pkl"
    class_dict = {"n02": [6, 7, 8], "n01": [0, 1, 2], "n03": [3, 4, 5]}
    with open(path, "wb") as fh:
        pickle.dump({"image_data": pixels, "class_dict": class_dict}, fh)
    data = load_pickled_split(path)
    assert isinstance(data, ImageDataset)
    assert data.class_names == ("n01", "n02", "n03")
    assert data.images.shape == (9, 3, 6, 6)
    torch.testing.assert_close(
        data.images[3], torch.from_numpy(pixels[6]).permute(2, 0, 1).float() / 255
    )
    assert torch.equal(data.labels, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    with open(path, "wb") as fh:
        pickle.dump({"images": pixels}, fh)
    with pytest.raises(TaskDataError, match="image_data"):
        load_pickled_split(path)
