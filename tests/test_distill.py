"""cascadec.distill.losses: Hinton KD with the tau^2 convention, and DistillLoss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cascadec.distill.losses import DistillLoss, kd_kl


def _logits(seed: int, n: int = 6, c: int = 10, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * scale


def _kl_by_hand(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * mean_n sum_c p_t (log p_t - log p_s), softmaxes at temperature tau."""
    p_t = torch.softmax(t.double() / tau, dim=1)
    log_p_t = torch.log_softmax(t.double() / tau, dim=1)
    log_p_s = torch.log_softmax(s.double() / tau, dim=1)
    return tau * tau * (p_t * (log_p_t - log_p_s)).sum(1).mean()


@pytest.mark.parametrize("tau", [1.0, 4.0, 15.0])
def test_kd_kl_zero_for_identical_logits(tau) -> None:
    z = _logits(0)
    # float32: softmax-then-log inside kl_div vs log_softmax differ by ~1e-7, times tau^2
    assert kd_kl(z, z.clone(), tau).abs().item() < 1e-6 * max(1.0, tau * tau)
    assert kd_kl(z.double(), z.double().clone(), tau).abs().item() < 1e-12


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0, 15.0])
def test_kd_kl_matches_manual_formula(tau) -> None:
    s, t = _logits(1), _logits(2)
    value = kd_kl(s, t, tau)
    assert value.item() > 0
    torch.testing.assert_close(value.double(), _kl_by_hand(s, t, tau), rtol=1e-5, atol=1e-7)


def test_kd_kl_tau_squared_convention() -> None:
    """The tau^2 factor keeps the KD gradient's magnitude roughly constant across temperatures:
    for large tau, tau^2 KL -> mean ||z_s - z_t (centred)||^2 / (2 C), independent of tau."""
    s, t = _logits(3, scale=0.5), _logits(4, scale=0.5)
    a, b = kd_kl(s, t, 50.0).item(), kd_kl(s, t, 100.0).item()
    assert a == pytest.approx(b, rel=0.02)
    ds = (s - s.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))
    c = s.shape[1]
    limit = (ds.pow(2).sum(1) / (2 * c)).mean().item()
    assert b == pytest.approx(limit, rel=0.02)
    # without the tau^2 factor the same quantity would shrink by 4x from tau 50 to 100
    unscaled = F.kl_div(F.log_softmax(s / 100.0, 1), F.softmax(t / 100.0, 1), reduction="batchmean").item()
    assert unscaled == pytest.approx(b / 100.0**2, rel=5e-3)  # float32: the two KL forms round differently


def test_kd_kl_does_not_backprop_into_teacher() -> None:
    s = _logits(5).requires_grad_(True)
    t = _logits(6).requires_grad_(True)
    kd_kl(s, t, 4.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_distill_loss_with_kd_weight_zero_is_cross_entropy() -> None:
    s, t = _logits(7), _logits(8)
    y = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(0))
    ce = F.cross_entropy(s, y)
    torch.testing.assert_close(DistillLoss(kd_weight=0.0)(s, y, t), ce)
    torch.testing.assert_close(DistillLoss()(s, y, None), ce)  # no teacher: plain CE
    torch.testing.assert_close(DistillLoss(ce_weight=2.0, kd_weight=0.0)(s, y, t), 2.0 * ce)


def test_distill_loss_combines_ce_and_weighted_kd() -> None:
    s, t = _logits(9), _logits(10)
    y = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(1))
    loss = DistillLoss(ce_weight=1.0, kd_weight=0.4, temperature=15.0)
    expected = F.cross_entropy(s.double(), y) + 0.4 * _kl_by_hand(s, t, 15.0)
    torch.testing.assert_close(loss(s, y, t).double(), expected, rtol=1e-5, atol=1e-7)
    # paper defaults
    d = DistillLoss()
    assert (d.ce_weight, d.kd_weight, d.temperature) == (1.0, 0.4, 15.0)
