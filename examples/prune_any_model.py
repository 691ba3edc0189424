"""Prune any torchvision model to a FLOPs target with the building blocks, no recipe:
analyse coupled channels, rank them, solve the target, shrink, save pickle-free, reload.

    python examples/prune_any_model.py mobilenet_v2
"""

import sys
import tempfile

import torch

from cascadec.models import create_model
from cascadec.prune.cost import CostModel, count_macs
from cascadec.prune.groups import build_groups
from cascadec.prune.importance import l1_importance
from cascadec.prune.masks import masked
from cascadec.prune.shrink import pruned_root_idxs, shrink
from cascadec.prune.spec import load_student, save_student
from cascadec.prune.targets import Budget, MaskSolver

name = sys.argv[1] if len(sys.argv) > 1 else "resnet18"
model = create_model(name, num_classes=10).eval()
example = torch.zeros(1, 3, 64, 64)

index = build_groups(model, example)  # Torch-Pruning dependency groups, as plain data
cost = CostModel.build(model, index, example)  # analytic MACs/params of any mask
solver = MaskSolver(index, cost, round_to=8)
keep = solver.solve(l1_importance(model, index), Budget.from_target(cost, flops_reduction=0.5))

student = shrink(model, index, keep, example)
x = torch.randn(2, 3, 64, 64)
with torch.no_grad(), masked(model, index, keep):
    print("masked == shrunk:", torch.allclose(model(x), student(x), atol=1e-5))
print(f"{name}: {count_macs(model, example) / 1e6:.1f}M -> {count_macs(student, example) / 1e6:.1f}M MACs")

with tempfile.TemporaryDirectory() as d:
    from pathlib import Path

    save_student(
        student,
        Path(d),
        model_name=name,
        model_kwargs={"num_classes": 10},
        input_shape=[3, 64, 64],
        removals=pruned_root_idxs(index, keep),
    )
    reloaded, _ = load_student(Path(d))  # safetensors + JSON: no pickle
    with torch.no_grad():
        print("reloaded == shrunk:", torch.equal(reloaded(x), student(x)))
