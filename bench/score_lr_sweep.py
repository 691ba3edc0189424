"""Sweep of cascade.score_lr (Eq. 5 step size) on Fashion-MNIST, cascade with 1 TA, no rounding.

    python bench/score_lr_sweep.py FLOPS_REDUCTION TEACHER.safetensors LR [LR ...]

TEACHER: cifar_resnet8 weights (.safetensors). The recorded run used the teacher that fmnist_quick
trained at the time (3 epochs on its 12k subset, 78.85 %), before the recipe switched to builtin:cifar_resnet8_fmnist.
Results of the run that set the default are in bench/results/score-lr-sweep.md. That run predates
issue 10: it used the paper's signed step (kept here with score_signal: taylor) and decided on the
2,000-image test subset; the script now decides on the selection split, as every run does.
"""

import sys
import time

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from cascadec.data import build_data
from cascadec.models import create_model
from cascadec.prune.analysis import analyse
from cascadec.prune.cascade_method import run_cascade
from cascadec.recipe import Recipe

torch.manual_seed(0)
b = build_data("fashion_mnist", train_limit=12000, val_limit=2000)
dl = DataLoader(b.train, batch_size=128, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
vl = DataLoader(b.selection, batch_size=256)  # decisions on held-out training images
t = create_model("cifar_resnet8", num_classes=10, in_channels=1)
t.load_state_dict(load_file(sys.argv[2]))
t.eval()
for lr in [float(x) for x in sys.argv[3:]]:
    r = Recipe.model_validate(
        {
            "name": "t",
            "model": {"name": "cifar_resnet8"},
            "prune": {"method": "cascade", "target": {"flops_reduction": float(sys.argv[1])}},
            "cascade": {"num_tas": 1, "score_lr": lr, "score_signal": "taylor"},
            "train": {"joint_epochs": 1, "student_epochs": 1, "lr": 0.02},
        }
    )
    torch.manual_seed(0)
    a = analyse(t, r, torch.zeros(1, 1, 28, 28))
    st = time.time()
    res = run_cascade(t, a, r, dl, vl, torch.device("cpu"))
    print(
        "lr",
        lr,
        "changed",
        res.history["mask_changed_units"],
        "acc",
        [e["student_accuracy"] for e in res.history["student"]],
        f"{time.time() - st:.0f}s",
        flush=True,
    )
