"""A frozen teacher's logits computed once per teacher, instead of once per epoch.

Why: in every KD epoch the teacher runs a forward pass over the same training images, and a
frozen teacher in eval mode gives the same logits for the same image every time. Where the
training images carry no random augmentation (Fashion-MNIST, digits and synthetic data are held
as fixed tensors), one pass before the first epoch serves them all. On the demo (ResNet-8, batch
128, 2 CPU threads) the teacher's forward pass is about a third of a KD step (52 ms of 149 ms).

A table costs one teacher pass over the whole data set, so it is built only when the epochs
ahead would show the teacher more images than that (not for a few capped steps per epoch).

Where a data set augments (CIFAR's crops and flips, an image folder's transforms), the images
differ every epoch and the teacher runs online as before: :func:`fixed_items` decides, and says
no to any data set it does not know. Losses that read the teacher's features (stage hints,
HSAKD) need its forward pass and do not use the cache either.

Under torchrun each rank computes its share of the rows and one all-reduce gives every rank the
whole table (the ranks' batches are slices of one global order, so any rank may need any row).
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from cascadec.data.tensors import TensorImageDataset
from cascadec.progress import Status, log
from cascadec.train.runtime import Runtime

MAX_BYTES = 1 << 30  # a table past 1 GiB (ImageNet's 1.28M x 1000 classes is 5 GB) stays online


def fixed_items(dataset: Dataset) -> bool:
    """True when item ``i`` is the same tensor every time it is read (no random augmentation)."""
    if isinstance(dataset, Subset):
        return fixed_items(dataset.dataset)
    if isinstance(dataset, TensorImageDataset):
        return dataset.augment is None
    if isinstance(dataset, TensorDataset):  # stored tensors, returned as they are
        return True
    return bool(getattr(dataset, "fixed_items", False))  # a plugin data set may declare it


class WithLogits(Dataset):
    """``dataset``'s items with the teacher's logits for that item appended."""

    def __init__(self, dataset: Dataset, logits: torch.Tensor) -> None:
        self.dataset, self.logits = dataset, logits

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        image, label = self.dataset[index][:2]
        return image, label, self.logits[index]


@torch.no_grad()
def teacher_logits(teacher: nn.Module, dataset: Dataset, *, batch_size: int, runtime: Runtime) -> torch.Tensor:
    """(N, classes) float32 on the CPU: ``teacher`` in eval mode on every item of ``dataset``, in
    the runtime's precision (what the online path computes); this rank's share, then all-reduced."""
    was_training = teacher.training
    teacher.eval()
    dist = runtime.dist
    rows = list(range(dist.rank, len(dataset), dist.world_size))  # type: ignore[arg-type]
    loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, shuffle=False)
    parts = []
    try:
        with Status("teacher logits (computed once)", len(loader)) as status:
            for batch in loader:
                images = batch[0].to(runtime.device)
                if runtime.channels_last and images.dim() == 4:
                    images = images.contiguous(memory_format=torch.channels_last)
                with runtime.autocast():
                    parts.append(teacher(images).float().cpu())
                status.advance()
    finally:
        teacher.train(was_training)
    mine = torch.cat(parts) if parts else torch.zeros(0, 0)
    if not dist.active:
        return mine
    table = torch.zeros(len(dataset), mine.shape[1])  # type: ignore[arg-type]
    table[rows] = mine
    # mean over ranks of tables that are zero outside each rank's rows, times the ranks: the rows
    return dist.all_reduce_mean(table.to(runtime.device)).cpu() * dist.world_size


class LogitCache:
    """One logits table per teacher (a key: the ladder level), built on first use; ``loader_for``
    returns the training loader with the logits in each batch, or None where the teacher must run
    online (augmented data, a table too large, or the cache switched off)."""

    def __init__(
        self, loader: DataLoader, runtime: Runtime, enabled: bool = True, images_ahead: int | None = None
    ) -> None:
        """``images_ahead``: the images the teacher would see online in the epochs to come (all
        ranks); a table costs one pass over the data set, so it is built only when that is fewer."""
        self.loader, self.runtime = loader, runtime
        worth_it = images_ahead is None or images_ahead > len(loader.dataset)  # type: ignore[arg-type]
        self.enabled = enabled and worth_it and fixed_items(loader.dataset)
        self.tables: dict[object, DataLoader] = {}
        self.seconds = 0.0

    def loader_for(self, key: object, teacher: nn.Module | None) -> DataLoader | None:
        if not self.enabled or teacher is None:
            return None
        if key not in self.tables:
            size = len(self.loader.dataset) * _classes(teacher, self.loader.dataset, self.runtime) * 4  # type: ignore[arg-type]
            if size > MAX_BYTES:
                log(f"teacher logits: a {size / 2**30:.1f} GiB table is too large to keep; the teacher runs every step")
                self.enabled = False
                return None
            start = time.perf_counter()
            batch = getattr(self.loader.batch_sampler, "batch_size", None) or self.loader.batch_size or 128
            logits = teacher_logits(teacher, self.loader.dataset, batch_size=batch, runtime=self.runtime)
            self.seconds += time.perf_counter() - start
            self.tables[key] = with_logits(self.loader, logits)
        return self.tables[key]


@torch.no_grad()
def _classes(teacher: nn.Module, dataset: Dataset, runtime: Runtime) -> int:
    was_training = teacher.training
    try:
        return int(teacher.eval()(dataset[0][0][None].to(runtime.device)).shape[-1])
    finally:
        teacher.train(was_training)


def with_logits(loader: DataLoader, logits: torch.Tensor) -> DataLoader:
    """``loader`` over the same items, in the same order (its own batch sampler), each batch
    carrying the teacher's logits as a third element (read by ``cascadec.train.loop.train_epoch``)."""
    extra = {"persistent_workers": True} if loader.num_workers > 0 and loader.persistent_workers else {}
    return DataLoader(
        WithLogits(loader.dataset, logits),
        batch_sampler=loader.batch_sampler,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        **extra,
    )
