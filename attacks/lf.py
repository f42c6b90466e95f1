"""``lf``: low-frequency (smooth) universal trigger (Zeng, Park, Mao & Jia, ICCV 2021, "Rethinking the
Backdoor Attacks' Triggers: A Frequency Perspective"). An additive perturbation with no high-frequency
content, x' = clip(x + δ); poisoned training samples are relabelled to the target (dirty label).

How the trigger is made here, and how that differs from the paper: Zeng et al. obtain δ by searching a
universal adversarial perturbation on a clean model *through a low-pass filter* (only a small window of
the lowest 2-D frequencies is kept), so δ is both smooth and aligned with a model's features;
BackdoorBench ships such a δ as a precomputed file per dataset. An attack here does no training and no
I/O, so δ is a fixed *random* low-frequency pattern instead: Gaussian noise (C, H, W) drawn from
``pattern_seed``, its 2-D FFT kept only at the frequencies |u| < ``cutoff`` and |v| < ``cutoff`` (rows and
columns, both signs; ``cutoff`` 3 keeps 5×5 of the 32×32 coefficients), transformed back and scaled so
that max |δ| = ``epsilon``. Same smoothness (the property the paper is about), not adversarially aligned,
so it may need more poison or epochs than the paper's trigger to be learnt.

Defaults: ``target`` 0 and ``poison_rate`` 0.1 (BackdoorBench); ``epsilon`` 0.1 (≈ 25/255) and
``cutoff`` 3 are this project's choices (the paper tunes its L∞ budget and window per dataset; these give a
faint but visible smooth colour cast on 32×32 images).
"""
from __future__ import annotations

import torch
from pydantic import Field

from attacks import ATTACKS
from attacks.base import Attack, PoisonParams


class LowFrequencyParams(PoisonParams):
    epsilon: float = Field(0.1, gt=0, le=1, description="L∞ size of the trigger δ (images in [0, 1])")
    cutoff: int = Field(3, ge=1, description="frequencies |u|, |v| < cutoff of the 2-D FFT are kept")
    pattern_seed: int = Field(0, description="seed of the trigger, fixed across trial seeds")


def low_frequency_pattern(shape: tuple[int, int, int], cutoff: int, epsilon: float, seed: int) -> torch.Tensor:
    """A (C, H, W) pattern with only the lowest 2-D frequencies, scaled to max |δ| = epsilon."""
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(c, h, w, generator=g, dtype=torch.float64)
    spec = torch.fft.fft2(noise)
    fu = torch.fft.fftfreq(h, d=1 / h).abs()  # integer frequency index, both signs
    fv = torch.fft.fftfreq(w, d=1 / w).abs()
    keep = (fu[:, None] < cutoff) & (fv[None, :] < cutoff)
    pattern = torch.fft.ifft2(spec * keep).real
    return (pattern * (epsilon / pattern.abs().max())).float()


@ATTACKS.register("lf")
class LowFrequency(Attack):
    name = "lf"
    Params = LowFrequencyParams

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        p = self.params
        self.pattern = low_frequency_pattern(self.info.shape, p.cutoff, p.epsilon, p.pattern_seed)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.pattern.to(x)).clamp(0, 1)
