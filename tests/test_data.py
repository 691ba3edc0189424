"""cascadec.data: every dataset builder, offline, on real or tiny fabricated files."""

from __future__ import annotations

import collections
import gzip
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cascadec.data import DataBundle, build_data, fashion_mnist, list_datasets
from cascadec.data.cifar import CIFAR10
from cascadec.data.synthetic import make_synthetic
from cascadec.errors import UserError

DEBIAN = fashion_mnist.DEBIAN_DIR
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(), reason="apt-get install dataset-fashion-mnist"
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user cache or $CASCADEC_DATA leaks in; the Debian folder stays visible."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CASCADEC_DATA", raising=False)


def _write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def _fake_fmnist(folder: Path, n_train: int = 30, n_val: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


# --------------------------------------------------------------------------- registry


def test_list_and_unknown() -> None:
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashion_mnist", "imagefolder", "synthetic"]
    with pytest.raises(UserError, match="did you mean fashion_mnist"):
        build_data("fashion-mnist")
    with pytest.raises(UserError, match="no option 'colour'"):
        build_data("synthetic", colour=True)
    with pytest.raises(UserError, match="image_size"):
        build_data("synthetic", image_size=0)
    with pytest.raises(UserError, match="train_limit"):
        build_data("synthetic", train_limit=-1)


# --------------------------------------------------------------------------- fashion-mnist


@needs_debian
def test_fashion_mnist_debian_path() -> None:
    bundle = build_data("fashion_mnist")
    assert isinstance(bundle, DataBundle) and str(DEBIAN) in bundle.description
    # the official 60k training set less the 5k selection split held out for decisions
    assert (len(bundle.train), len(bundle.selection), len(bundle.val)) == (55000, 5000, 10000)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 28)
    assert bundle.mean == (0.2860,) and bundle.std == (0.3530,)
    x, y = bundle.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    full = bundle.train.dataset  # type: ignore[attr-defined]
    assert set(full.targets.tolist()) == set(range(10))
    sample = torch.stack([bundle.train[i][0] for i in range(0, 55000, 97)])
    assert abs(sample.mean().item()) < 0.05 and abs(sample.std().item() - 1) < 0.05
    raw = full.images[bundle.train_indices[0]].float() / 255
    torch.testing.assert_close(x, (raw - 0.2860) / 0.3530)


@needs_debian
def test_fashion_mnist_copy_resized_and_limited(tmp_path: Path) -> None:
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    for f in DEBIAN.glob("*-ubyte.gz"):
        shutil.copy(f, raw / f.name)
    bundle = build_data("fashion_mnist", tmp_path / "tv", image_size=32, train_limit=200, val_limit=50, seed=3)
    assert str(raw) in bundle.description
    assert bundle.train[0][0].shape == (1, 32, 32) and (len(bundle.train), len(bundle.val)) == (200, 50)
    counts = collections.Counter(bundle.train[i][1] for i in range(200))
    assert counts == {c: 20 for c in range(10)}
    again = build_data("fashion_mnist", tmp_path / "tv", train_limit=200, seed=3)
    assert again.train.indices == bundle.train.indices  # type: ignore[attr-defined]


def test_fashion_mnist_fabricated_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _fake_fmnist(tmp_path / "fm")
    bundle = build_data("fashion_mnist", folder)
    assert (len(bundle.train), len(bundle.selection), len(bundle.val)) == (27, 3, 10)  # 10 % held out for selection
    assert [bundle.val[i][1] for i in range(10)] == list(range(10))
    monkeypatch.setenv("CASCADEC_DATA", str(tmp_path / "envdata"))
    _fake_fmnist(tmp_path / "envdata" / "fashion_mnist", n_train=12)
    assert len(build_data("fashion_mnist").train) == 11
    plain = tmp_path / "plain"  # uncompressed files are fine too
    plain.mkdir()
    for prefix, n in (("train", 4), ("t10k", 2)):
        _write_idx(plain / f"{prefix}-images-idx3-ubyte", np.zeros((n, 28, 28)), compress=False)
        _write_idx(plain / f"{prefix}-labels-idx1-ubyte", np.zeros(n), compress=False)
    assert len(build_data("fashion_mnist", plain).val) == 2


def test_fashion_mnist_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"looked in: .*nowhere.*apt-get install dataset-fashion-mnist"):
        build_data("fashion_mnist", tmp_path / "nowhere")
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    with pytest.raises(UserError, match=r"no-debian.*--data PATH") as err:
        build_data("fashion_mnist")
    assert str(tmp_path / "home" / ".cache" / "cascadec" / "fashion_mnist") in str(err.value)


def test_download_failures_are_user_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nno network")

    for cls in ("FashionMNIST", "CIFAR10"):
        monkeypatch.setattr(tvd, cls, offline)
    with pytest.raises(UserError, match=r"downloading Fashion-MNIST into .*dl failed: Error") as err:
        build_data("fashion_mnist", tmp_path / "dl", download=True)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"downloading cifar10 into .*cache.*failed"):
        build_data("cifar10", download=True)


def test_fashion_mnist_corrupt_files(tmp_path: Path) -> None:
    folder = _fake_fmnist(tmp_path / "fm")
    labels = folder / "train-labels-idx1-ubyte.gz"
    good = labels.read_bytes()
    labels.write_bytes(good[: len(good) // 2])  # truncated gzip stream
    with pytest.raises(UserError, match=r"train-labels-idx1-ubyte\.gz is truncated or corrupt") as err:
        build_data("fashion_mnist", folder)
    assert "\n" not in str(err.value)
    with gzip.open(labels, "wb") as handle:  # valid gzip, short payload
        handle.write(struct.pack(">BBBBI", 0, 0, 8, 1, 30) + bytes(12))
    with pytest.raises(UserError, match="header says"):
        build_data("fashion_mnist", folder)
    with gzip.open(labels, "wb") as handle:  # wrong magic (an image file as labels)
        handle.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 1, 1, 1) + bytes(1))
    with pytest.raises(UserError, match="not an IDX file"):
        build_data("fashion_mnist", folder)
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="truncated or corrupt"):
        build_data("fashion_mnist", folder)


# --------------------------------------------------------------------------- digits, synthetic


def test_digits() -> None:
    bundle = build_data("digits")
    assert (len(bundle.train), len(bundle.selection), len(bundle.val)) == (1293, 144, 360)
    assert bundle.train[0][0].shape == (1, 16, 16) and bundle.in_channels == 1
    assert sorted(collections.Counter(bundle.val.targets.tolist()).values())[0] >= 35  # type: ignore[attr-defined]
    again = build_data("digits", image_size=8, seed=5)
    assert again.train[0][0].shape == (1, 8, 8)
    torch.testing.assert_close(again.val.targets, bundle.val.targets)  # type: ignore[attr-defined]
    x8 = torch.stack([again.train[i][0] for i in range(len(again.train))])
    assert abs(x8.mean().item()) < 0.01 and abs(x8.std().item() - 1) < 0.01


def test_synthetic_deterministic_and_learnable() -> None:
    a = build_data("synthetic", seed=7, in_channels=2, image_size=12, num_classes=4, train_size=200)
    b = build_data("synthetic", seed=7, in_channels=2, image_size=12, num_classes=4, train_size=200)
    c = build_data("synthetic", seed=8, in_channels=2, image_size=12, num_classes=4, train_size=200)
    assert a.train[0][0].shape == (2, 12, 12) and a.num_classes == 4
    full_a, full_b, full_c = a.train.dataset, b.train.dataset, c.train.dataset  # type: ignore[attr-defined]
    torch.testing.assert_close(full_a.images, full_b.images)
    assert not torch.equal(full_a.images, full_c.images)
    assert not torch.equal(full_a.images[:50], a.val.images[:50])  # type: ignore[attr-defined]
    assert collections.Counter(full_a.targets.tolist()) == {k: 50 for k in range(4)}
    assert (len(a.train), len(a.selection)) == (180, 20)
    torch.manual_seed(0)
    x = torch.stack([a.train[i][0] for i in range(180)]).flatten(1)
    y = torch.tensor([a.train[i][1] for i in range(180)])
    clf = torch.nn.Linear(x.shape[1], 4)
    opt = torch.optim.SGD(clf.parameters(), lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(x), y).backward()
        opt.step()
    xv = torch.stack([a.val[i][0] for i in range(len(a.val))]).flatten(1)
    yv = torch.tensor([a.val[i][1] for i in range(len(a.val))])
    assert (clf(xv).argmax(1) == yv).float().mean() > 0.8
    with pytest.raises(UserError, match="channels"):
        make_synthetic(4, channels=0)


def test_dataloader_collates() -> None:
    bundle = build_data("synthetic", in_channels=1, image_size=8, train_limit=20, val_limit=10)
    x, y = next(iter(DataLoader(bundle.train, batch_size=8, shuffle=True)))
    assert x.shape == (8, 1, 8, 8) and y.dtype == torch.int64
    assert (len(bundle.train), len(bundle.val)) == (20, 10)


# --------------------------------------------------------------------------- imagefolder


def _png_tree(root: Path, splits: dict[str, list[str]]) -> None:
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def test_imagefolder(tmp_path: Path) -> None:
    _png_tree(tmp_path / "tree", {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    bundle = build_data("imagefolder", tmp_path / "tree", image_size=32)
    assert bundle.num_classes == 2 and bundle.in_channels == 3
    assert (len(bundle.train), len(bundle.selection), len(bundle.val)) == (5, 1, 6)
    x, y = bundle.train[0]
    assert x.shape == (3, 32, 32) and bundle.val[5][1] == 1
    # selection images go through the evaluation transform: no random crop, so always the same
    torch.testing.assert_close(bundle.selection[0][0], bundle.selection[0][0])
    assert bundle.mean == (0.485, 0.456, 0.406)
    no_aug = build_data("imagefolder", tmp_path / "tree", image_size=32, augment=False)
    torch.testing.assert_close(no_aug.train[0][0], no_aug.train[0][0])  # val transform: deterministic


def test_imagefolder_errors(tmp_path: Path) -> None:
    _png_tree(tmp_path / "only_train", {"train": ["a", "b"]})
    with pytest.raises(UserError, match=r"only_train/val is missing"):
        build_data("imagefolder", tmp_path / "only_train")
    with pytest.raises(UserError, match="--data PATH"):
        build_data("imagefolder")
    _png_tree(tmp_path / "odd", {"train": ["a", "b"], "val": ["a", "c"]})
    with pytest.raises(UserError, match="different classes"):
        build_data("imagefolder", tmp_path / "odd")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(UserError, match="empty/train"):
        build_data("imagefolder", tmp_path / "empty")


# --------------------------------------------------------------------------- cifar


def _cifar_batch(path: Path, n: int, label_key: str, num_classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch = {
        "batch_label": "fake",
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in np.arange(n) % num_classes],
    }
    with path.open("wb") as handle:
        pickle.dump(batch, handle, protocol=2)


def _fake_cifar10(root: Path, n: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate(CIFAR10.train_files + CIFAR10.val_files):
        _cifar_batch(folder / name, n, "labels", 10, i)
    return folder


def test_cifar10_layout(tmp_path: Path) -> None:
    folder = _fake_cifar10(tmp_path / "data")
    bundle = build_data("cifar10", tmp_path / "data")
    assert (len(bundle.train), len(bundle.selection), len(bundle.val), bundle.num_classes) == (18, 2, 4, 10)
    x, y = bundle.val[1]
    assert x.shape == (3, 32, 32) and y == 1
    raw = bundle.val.images[1].float() / 255  # type: ignore[attr-defined]
    mean, std = torch.tensor(CIFAR10.mean).view(3, 1, 1), torch.tensor(CIFAR10.std).view(3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)
    assert bundle.train[0][0].shape == (3, 32, 32)  # augmented, same size
    plain = build_data("cifar10", folder, augment=False, image_size=16)  # the folder itself
    assert plain.train[0][0].shape == (3, 16, 16) and "augmentation off" in plain.description


def test_cifar100_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _cifar_batch(folder / "train", 6, "fine_labels", 100, 0)
    _cifar_batch(folder / "test", 3, "fine_labels", 100, 1)
    bundle = build_data("cifar100", tmp_path, train_limit=3)
    assert bundle.num_classes == 100 and (len(bundle.train), len(bundle.val)) == (3, 3)
    assert bundle.mean == (0.5071, 0.4865, 0.4409)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cifar10 not found \(looked for .*nothing"):
        build_data("cifar10", tmp_path / "nothing")
    folder = _fake_cifar10(tmp_path / "data")
    (folder / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3 is missing"):
        build_data("cifar10", tmp_path / "data")
    good = (folder / "data_batch_1").read_bytes()
    (folder / "data_batch_3").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="data_batch_3 is truncated or corrupt"):
        build_data("cifar10", tmp_path / "data")
    with (folder / "data_batch_3").open("wb") as handle:
        pickle.dump({"data": _Evil(), "labels": []}, handle)
    with pytest.raises(UserError, match=r"builtins\.print is not allowed"):
        build_data("cifar10", tmp_path / "data")
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}))
    with pytest.raises(UserError, match="out of range"):
        build_data("cifar10", tmp_path / "data")
