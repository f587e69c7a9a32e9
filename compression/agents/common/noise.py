"""Exploration noise: AMC's truncated normal around the actor's output, with a per-episode decaying sigma."""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri


class TruncatedNormalNoise:
    """Sample actions from N(mu, sigma) truncated to [low, high]; sigma = sigma0 * decay ** k.

    ``k`` counts episodes since the end of the warm-up (AMC: ``delta = init_delta * delta_decay **
    (episode - warmup)``). Truncation keeps every sample a valid action without piling clipped mass onto
    the bounds. Sampling is by inverting the normal CDF between the bounds' CDF values; since ``mu`` lies
    within the bounds, that interval always contains the median, so the inversion stays accurate.
    """

    def __init__(self, sigma0: float, decay: float, low: float = 0.0, high: float = 1.0) -> None:
        self.sigma0 = float(sigma0)
        self.decay = float(decay)
        self.low = float(low)
        self.high = float(high)

    def sigma(self, k: int) -> float:
        """Noise scale ``k`` episodes after the warm-up."""
        return self.sigma0 * self.decay ** max(0, int(k))

    def sample(self, mu: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
        """One noisy action per entry of ``mu`` (float64, within [low, high]); draws from ``rng`` only."""
        mu = np.clip(np.asarray(mu, dtype=np.float64), self.low, self.high)
        if sigma <= 1e-12:
            return mu
        lo_cdf = ndtr((self.low - mu) / sigma)
        hi_cdf = ndtr((self.high - mu) / sigma)
        u = rng.random(mu.shape)
        out = mu + sigma * ndtri(lo_cdf + u * (hi_cdf - lo_cdf))
        return np.clip(out, self.low, self.high)
