"""The latency protocol's defaults, in one place (trtexec's; no torch import, so the recipe
schema reads them without the runtime): ``cascadec.recipe.ProfileSection`` and
``cascadec.profile.protocol.Timing`` both take their defaults from here."""

from __future__ import annotations

MIN_WARMUP_S = 0.2  # trtexec --warmUp default (ms=200); a lower warm-up is raised to it
DEFAULT_DURATION_S = 3.0  # trtexec --duration default
DEFAULT_MIN_ITERS = 10  # trtexec --iterations default
DEFAULT_ROUNDS = 3  # teacher and student take turns this many times (cascadec's own)
