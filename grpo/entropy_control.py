"""Entropy that cannot blow up: an adaptive entropy-bonus coefficient that acts only below a target entropy.

Why: a fixed bonus (verl's entropy_coeff) is the only force left once every group's rewards are equal, and
then it fills the text with random tokens from the 262k vocabulary (BUILD.md, the first accelerator run).
Skywork-OR1 (He et al., 2025, "adaptive entropy control") instead keeps a coefficient c that rises by `step`
while the policy's entropy H is below `target` and falls by `step` while it is above, clipped to [0, max_coef],
and applies it only while H < target. Above the target the bonus is exactly 0, so it cannot push entropy up
without bound; below it, it grows until entropy comes back. A step with no token to learn from because every
group's rewards were equal measures no entropy; the loop counts it as below the target (grpo/trainer.py).

The coefficient reaches the jitted step as data (a per-row batch array "entropy_coef", grpo/loss.py), so a
changing coefficient never recompiles the step.

ENTROPY_BAND is what the metrics and the report call healthy, in nats per completion token: below it the policy
has collapsed to near-deterministic answers (GRPO's groups lose their differences), above it the completions
are noise. The keep-the-best guard reuses it.
"""

from __future__ import annotations

import dataclasses

ENTROPY_BAND = (0.05, 2.0)  # nats/token: (collapsed below, noise above)
DEFAULT_TARGET = 0.3  # nats/token: a little above Skywork-OR1's 0.2 (larger models), see BUILD.md for our runs


@dataclasses.dataclass(frozen=True)
class EntropyControl:
    """The controller's settings; `None` in its place means no controller (a fixed entropy_coef, or none)."""

    target: float = DEFAULT_TARGET  # nats/token the bonus defends from below
    # Coefficient change per training step (Skywork-OR1's delta) and its cap: a lower cap did not hold a LoRA run's
    # entropy at the target (BUILD.md, issue 22's runs); a higher one stays safe because the bonus is 0 above it.
    step: float = 0.01
    max_coef: float = 0.1

    def __post_init__(self):
        if not self.target > 0:
            raise ValueError(f"target_entropy must be > 0, got {self.target}")
        if self.step <= 0 or self.max_coef <= 0:
            raise ValueError(f"entropy control step and max_coef must be > 0, got {self.step}, {self.max_coef}")


def next_coef(ctrl: EntropyControl, coef: float, entropy: float | None) -> float:
    """The controller's coefficient after a step that measured `entropy` (None: nothing measured, unchanged)."""
    if entropy is None:
        return coef
    moved = coef + ctrl.step if entropy < ctrl.target else coef - ctrl.step
    return float(min(max(moved, 0.0), ctrl.max_coef))


def applied_coef(ctrl: EntropyControl, coef: float, entropy: float | None) -> float:
    """The bonus the next step applies: the coefficient while the last measured entropy is below the target,
    else exactly 0 (the controller is inert above its target). Nothing measured yet: 0."""
    if entropy is None or entropy >= ctrl.target:
        return 0.0
    return coef


def band_note(entropy: float | None) -> str | None:
    """One line when entropy is outside ENTROPY_BAND, else None."""
    low, high = ENTROPY_BAND
    if entropy is None or low <= entropy <= high:
        return None
    side = "below" if entropy < low else "above"
    what = "collapse: near-deterministic answers" if entropy < low else "noise in the completions"
    return f"entropy {entropy:.3f} nats/token is {side} the band [{low:g}, {high:g}] ({what})"
