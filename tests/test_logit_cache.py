"""Teacher logits computed once per teacher (cascadec.distill.logit_cache): the same training as
the teacher running every step, with the teacher's forward passes cut to one per image."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.tiny_prune import tiny_data
from torch.utils.data import DataLoader, Subset, TensorDataset

from cascadec.data.tensors import RandomCropFlip, TensorImageDataset
from cascadec.distill.logit_cache import LogitCache, fixed_items, teacher_logits, with_logits
from cascadec.distill.losses import DistillLoss
from cascadec.prune.finetune import PhaseSettings, student_phase
from cascadec.train.loop import train_epoch
from cascadec.train.runtime import Runtime

CPU = torch.device("cpu")


def _images(augment=None) -> TensorImageDataset:
    x = torch.randint(0, 255, (6, 1, 8, 8), dtype=torch.uint8)
    return TensorImageDataset(x, torch.arange(6) % 3, mean=(0.5,), std=(0.5,), augment=augment)


def test_only_data_sets_without_random_augmentation_are_cached():
    assert fixed_items(_images())
    assert fixed_items(Subset(_images(), [0, 2]))
    assert fixed_items(TensorDataset(torch.zeros(3, 1), torch.zeros(3)))
    assert not fixed_items(_images(RandomCropFlip(2)))
    assert not fixed_items(Subset(_images(RandomCropFlip(2)), [1]))
    assert not fixed_items(torch.utils.data.Dataset())  # an unknown data set: the teacher stays online
    loader = DataLoader(_images(RandomCropFlip(2)), batch_size=2)
    assert LogitCache(loader, Runtime(CPU)).loader_for(0, torch.nn.Identity()) is None
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    fixed = DataLoader(_images(), batch_size=2)
    # a table costs a pass over all 6 images: built only when the teacher would see more online
    assert LogitCache(fixed, Runtime(CPU), images_ahead=6).loader_for(0, net) is None
    assert LogitCache(fixed, Runtime(CPU), images_ahead=7).loader_for(0, net) is not None


class _Counting(torch.nn.Module):
    """A teacher that counts the images it is run on."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.images = net, 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.net(x)


def test_the_table_holds_the_teachers_eval_logits_row_for_row():
    teacher, loader, _ = tiny_data()
    teacher.train()  # the table is computed in eval mode and leaves the mode as it was
    table = teacher_logits(teacher, loader.dataset, batch_size=5, runtime=Runtime(CPU))
    assert teacher.training
    x = loader.dataset.tensors[0]
    with torch.no_grad():
        expected = copy.deepcopy(teacher).eval()(x)
    assert table.shape == expected.shape and torch.allclose(table, expected, atol=1e-5)
    batch = next(iter(with_logits(loader, table)))
    assert len(batch) == 3 and torch.equal(batch[2], table[: len(batch[0])])  # same order as the loader


def test_train_epoch_reads_cached_logits_and_never_runs_the_teacher():
    teacher, loader, _ = tiny_data()
    counting = _Counting(teacher)
    table = teacher_logits(counting, loader.dataset, batch_size=8, runtime=Runtime(CPU))
    assert counting.images == len(loader.dataset)
    student = copy.deepcopy(teacher)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    seen = []

    def loss(logits, labels, teacher_logits):
        seen.append(teacher_logits)
        return DistillLoss()(logits, labels, teacher_logits)

    train_epoch(student, with_logits(loader, table), opt, None, loss, device=CPU, teacher=counting)
    assert counting.images == len(loader.dataset)  # not one more image through the teacher
    assert torch.allclose(torch.cat(seen), table)


def _phase(teacher, loader, *, cache: bool):
    torch.manual_seed(1)
    student = copy.deepcopy(teacher.net)
    history = student_phase(
        student,
        None,
        None,
        [("teacher", teacher)],
        loader,
        loader,
        DistillLoss(kd_weight=0.9, temperature=4.0),
        PhaseSettings(epochs=3, lr=0.05, select_best=False, cache_logits=cache),
        device=CPU,
    )
    return student, history


def test_the_student_phase_trains_the_same_student_with_the_teacher_run_once():
    net, loader, _ = tiny_data()
    online_teacher, cached_teacher = _Counting(copy.deepcopy(net)).eval(), _Counting(copy.deepcopy(net)).eval()
    online, online_history = _phase(online_teacher, loader, cache=False)
    cached, cached_history = _phase(cached_teacher, loader, cache=True)
    images = len(loader.dataset)
    # both evaluate the teacher on the selection images once; then online: every training image of
    # every epoch; cached: one image to size the table, then the table
    assert online_teacher.images - images == 3 * images
    assert cached_teacher.images - images == 1 + images
    for a, b in zip(online_history[1:], cached_history[1:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert "teacher_logits_seconds" in cached_history[1] and "teacher_logits_seconds" not in cached_history[2]
    for a, b in zip(online.state_dict().values(), cached.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


class _OneRank:
    """A rank of a ``world``-process job whose all-reduce is left to the test: it returns this
    rank's table as is, so the test can add the ranks' tables itself."""

    active = True

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world_size = rank, world

    def all_reduce_mean(self, tensor):
        return tensor / self.world_size  # this rank's share of the mean; the test sums the ranks


def test_ranks_share_the_work_and_their_tables_add_up_to_the_whole():
    teacher, loader, _ = tiny_data(images=13)  # rows do not divide evenly between the ranks
    with torch.no_grad():
        expected = copy.deepcopy(teacher).eval()(loader.dataset.tensors[0])
    tables, images = [], []
    for rank in range(3):
        counting = _Counting(teacher)
        runtime = Runtime(CPU, dist=_OneRank(rank, 3))
        tables.append(teacher_logits(counting, loader.dataset, batch_size=4, runtime=runtime))
        images.append(counting.images)
    assert images == [5, 4, 4]  # each rank ran only its own rows
    for rank, table in enumerate(tables):  # zero outside its rows, the teacher's logits in them
        rows = list(range(rank, 13, 3))
        assert torch.allclose(table[rows], expected[rows], atol=1e-5)
        assert not table[[r for r in range(13) if r not in rows]].any()
    assert torch.allclose(sum(tables), expected, atol=1e-5)  # what the all-reduce sum gives every rank
