"""One rank of tests/test_grad_sync.py: the same steps averaged by ``Dist.sync_grads`` (after
backward, one piece) and by ``OverlappedGradSync`` (buckets during backward), gradients saved
for the test to compare."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from cascadec.train.distributed import Dist
from cascadec.train.grad_sync import OverlappedGradSync


class Shared(nn.Module):
    """A conv used twice (a shared weight, as the cascade's models share theirs), a score leaf
    outside any module, and a branch that gets no gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 5)
        self.unused = nn.Linear(3, 3)
        self.score = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor, with_score: bool) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        if with_score:
            x = x * torch.sigmoid(self.score).view(1, -1, 1, 1)
        x = torch.relu(self.conv(x))
        return self.head(x.flatten(1))


def run(rank: int, world: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    dist = Dist(rank, world, rank)
    torch.manual_seed(0)
    batches = [(torch.randn(8, 4, 6, 6), torch.randint(0, 5, (8,))) for _ in range(4)]
    results: dict[str, list] = {"after": [], "overlap": [], "one-bucket": []}
    early: list[int] = []
    sizes = {"overlap": (0.0005, 0.0002), "one-bucket": (25.0, 1.0)}  # MB: many buckets; DDP's (one here)
    for mode in ("after", "overlap", "one-bucket"):
        model = Shared()
        params = list(model.parameters())
        sync = None
        if mode != "after":
            sync = OverlappedGradSync(params, dist, bucket_mb=sizes[mode][0], first_bucket_mb=sizes[mode][1])
        for step, (x, y) in enumerate(batches):
            # steps 0-1 average the score; step 2 uses it but leaves it out of the average (a
            # tensor the caller does not step); step 3 does not use it (the cascade's frozen masks)
            with_score = step < 3
            step_params = params if step < 2 else [p for p in params if p is not model.score]
            model.zero_grad(set_to_none=True)
            rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
            loss = nn.functional.cross_entropy(model(x[rows], with_score), y[rows])
            if sync is not None:
                sync.begin(step_params)
                before = sync.early_launches
            loss.backward()
            if sync is not None:
                if mode == "overlap":
                    early.append(sync.early_launches - before)
                sync.finish()
            else:
                dist.sync_grads(step_params)
            results[mode].append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p -= 0.1 * p.grad
        if sync is not None:
            results[f"{mode}-buckets"] = len(sync.buckets or [])
            results[f"{mode}-hooks"] = len(sync._handles)
            sync.close()
    results["early"] = early
    torch.save(results, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
