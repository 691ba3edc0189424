"""Hinton knowledge distillation, as the paper uses it (docs/paper.md, Losses).

The paper does not say whether the KL term is scaled by tau^2; we follow Hinton et al.
(2015) and scale it, so the KD gradient keeps its magnitude at the paper's tau = 15.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 * KL(teacher_tau || student_tau), batch mean."""
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)  # log-space: exactly 0 for equal logits
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


@dataclass
class DistillLoss:
    """CE(y) * ce_weight + kd_weight * tau^2 KL; ``kd_weight = 0`` or no teacher is plain CE."""

    ce_weight: float = 1.0
    kd_weight: float = 0.4
    temperature: float = 15.0

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        loss = self.ce_weight * F.cross_entropy(logits, labels)
        if teacher_logits is not None and self.kd_weight > 0:
            loss = loss + self.kd_weight * kd_kl(logits, teacher_logits, self.temperature)
        return loss
