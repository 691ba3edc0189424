"""Train the Fashion-MNIST teacher that ships with cascadec (``builtin:cifar_resnet8_fmnist``).

    python scripts/train_fmnist_teacher.py [--epochs 30] [--lr 0.05] [--threads N] [--out cascadec/models/pretrained]

Plain supervised training (cascadec.teacher.train_teacher: SGD, Nesterov momentum 0.9,
weight decay 4e-4, cosine LR from 0.05, batch 128, seed 0) on the full 60,000-image
training set less the 5,000-image selection split that cascadec holds out (seed 0), so that
selection images are new to the teacher too; accuracy on the official 10,000-image test set
is written next to the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from cascadec.data import build_data
from cascadec.data.loaders import make_loaders
from cascadec.models import create_model
from cascadec.prune.spec import state_dict_for_safetensors
from cascadec.recipe import Recipe
from cascadec.run import library_versions
from cascadec.teacher import train_teacher
from cascadec.train.loop import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "cascadec/models/pretrained"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe.model_validate(
        {
            "name": "fmnist_teacher",
            "model": {"name": "cifar_resnet8"},
            "data": {"name": "fashion_mnist", "batch_size": 128},
            "teacher": {"train_epochs": args.epochs, "lr": args.lr},
            "train": {"seed": 0},
        }
    )
    torch.manual_seed(0)
    bundle = build_data("fashion_mnist", seed=0)
    loaders = make_loaders(bundle, recipe, torch.device("cpu"))
    model = create_model("cifar_resnet8", num_classes=10, in_channels=1)
    start = time.perf_counter()
    train_teacher(model, recipe, loaders.train, torch.device("cpu"))
    accuracy = evaluate(model, loaders.val, device=torch.device("cpu"), description="evaluate teacher")
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_for_safetensors(model.eval()), str(args.out / "cifar_resnet8_fmnist.safetensors"))
    card = {
        "model": "cifar_resnet8",
        "model_kwargs": {"num_classes": 10, "in_channels": 1},
        "data": "fashion_mnist (55k train: the 60k official training set less the 5k selection split cascadec holds out with seed 0; accuracy on the 10k test set)",
        "epochs": args.epochs,
        "accuracy": accuracy,
        "train_seconds": round(seconds, 1),
        "command": " ".join(["python", *sys.argv]),
        "versions": library_versions(),
    }
    (args.out / "cifar_resnet8_fmnist.json").write_text(json.dumps(card, indent=2))
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
