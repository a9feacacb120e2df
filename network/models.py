"""The small stochastic and analytic models of a link, as pure functions and one tiny
stateful chain. Every function takes its ``numpy.random.Generator`` explicitly.

Units: sizes in bytes, rates in bits/s, times in seconds, probabilities in [0, 1].
"""
from __future__ import annotations

import math

import numpy as np

from .config import Jitter, Loss


# ----------------------------------------------------------------------------- loss
def packets(nbytes: int, mss: int) -> int:
    """Packets a message of ``nbytes`` is cut into for the loss model: ceil(B / MSS), >= 1
    (an empty message still travels as one packet of headers)."""
    return max(1, -(-int(nbytes) // int(mss)))


def p_intact(p: float, n: int) -> float:
    """P(no packet of n lost) under Bernoulli loss p: (1 - p)^n, computed stably."""
    if p >= 1.0:
        return 0.0
    return math.exp(n * math.log1p(-p))


class GilbertElliott:
    """The Gilbert-Elliott chain over a link's packets.

    States Good/Bad; after each packet Good -> Bad with probability ``p`` and Bad -> Good
    with ``r``, so sojourns are geometric (means 1/p and 1/r packets). A packet is lost with
    probability 1 - k in Good and 1 - h in Bad. The chain starts in its stationary
    distribution and carries its state from one message to the next (idle time between
    messages does not move it). Sampling walks sojourn by sojourn, so a message costs
    O(number of state changes), not O(packets) Python steps.
    """

    def __init__(self, loss: Loss, rng: np.random.Generator):
        self.loss = loss
        self.rng = rng
        pi_bad = loss.p / (loss.p + loss.r) if loss.p + loss.r > 0 else 0.0
        self.bad = bool(rng.random() < pi_bad)
        self._left = self._sojourn()

    def _sojourn(self) -> float:
        leave = self.loss.r if self.bad else self.loss.p
        return math.inf if leave <= 0 else float(self.rng.geometric(leave))

    def sample(self, n: int) -> np.ndarray:
        """Loss indicators (True = lost) of the next ``n`` packets."""
        out = np.empty(n, dtype=bool)
        i = 0
        while i < n:
            if self._left <= 0:
                self.bad = not self.bad
                self._left = self._sojourn()
            m = int(min(self._left, n - i))
            survive = self.loss.h if self.bad else self.loss.k
            if survive >= 1.0:
                out[i:i + m] = False
            elif survive <= 0.0:
                out[i:i + m] = True
            else:
                out[i:i + m] = self.rng.random(m) >= survive
            i += m
            self._left -= m
        return out


# ----------------------------------------------------------------------------- jitter
def sample_jitter(j: Jitter, rng: np.random.Generator, size: int) -> np.ndarray:
    """Extra one-way delays (seconds) drawn from ``j``; always ``size`` draws of the
    distribution's base variate, so the stream stays aligned whatever the outcome."""
    if j.distribution == "none" or j.scale == 0.0:
        return np.zeros(size)
    if j.distribution == "normal":
        return j.scale * rng.standard_normal(size)
    if j.distribution == "lognormal":
        # mean exp(mu + sigma^2/2) = scale
        sigma = j.shape
        return j.scale * np.exp(sigma * rng.standard_normal(size) - 0.5 * sigma * sigma)
    if j.distribution == "pareto":
        # numpy's pareto(a) is Lomax with scale 1 and mean 1/(a-1)
        return j.scale * (j.shape - 1.0) * rng.pareto(j.shape, size)
    raise ValueError(f"unknown jitter distribution {j.distribution!r}")


# ----------------------------------------------------------------------------- tcp
MATHIS_C = math.sqrt(1.5)   # 1.2247..., the "1.22" of Mathis et al. (1997), periodic loss


def mathis_rate(mss: int, rtt: float, p: float) -> float:
    """Mathis et al.: throughput <= MSS / RTT * C / sqrt(p), in bits/s (inf if p = 0)."""
    if p <= 0:
        return math.inf
    if rtt <= 0:
        return math.inf
    return 8.0 * mss / rtt * MATHIS_C / math.sqrt(p)


def padhye_rate(mss: int, rtt: float, p: float, rto: float, b: int = 1, wmax_bytes: float = math.inf) -> float:
    """Padhye et al. (1998), the approximate model (their eq. 33), in bits/s:

        B(p) = min( Wmax / RTT,
                    MSS / ( RTT sqrt(2bp/3) + T0 min(1, 3 sqrt(3bp/8)) p (1 + 32 p^2) ) )

    For small p the first term of the denominator dominates and B(p) is Mathis' law (with
    b = 1: MSS/RTT * sqrt(3/2)/sqrt(p)); past a few percent the retransmission-timeout
    term T0 takes over and throughput falls much faster than 1/sqrt(p).
    """
    window = math.inf if not math.isfinite(wmax_bytes) or rtt <= 0 else 8.0 * wmax_bytes / rtt
    if p <= 0:
        return window
    denom = rtt * math.sqrt(2.0 * b * p / 3.0) + rto * min(1.0, 3.0 * math.sqrt(3.0 * b * p / 8.0)) * p * (1.0 + 32.0 * p * p)
    if denom <= 0:
        return window
    return min(window, 8.0 * mss / denom)


def tcp_rto(min_rto: float, rtt: float, rtt_std: float) -> float:
    """Retransmission timeout T0 (RFC 6298 shape): max(min_rto, RTT + 4 sigma_RTT), <= 60 s."""
    return min(60.0, max(min_rto, rtt + 4.0 * rtt_std))


# ----------------------------------------------------------------------------- devices
def device_speeds(distribution: str, speed: float, sigma: float, alpha: float, speeds: tuple[float, ...],
                  n: int, rng: np.random.Generator) -> np.ndarray:
    """Per-client compute speeds in FLOP/s.

    ``lognormal``: speed * exp(sigma Z) (median ``speed``); ``pareto``: speed / X with
    X ~ Pareto(alpha, x_m = 1) (``speed`` is the fastest; a heavy tail of slow devices);
    ``trace``: ``speeds[i % len(speeds)]``; ``none``: all equal to ``speed``.
    """
    if distribution == "none":
        return np.full(n, float(speed))
    if distribution == "lognormal":
        return speed * np.exp(sigma * rng.standard_normal(n))
    if distribution == "pareto":
        return speed / (1.0 + rng.pareto(alpha, n))
    if distribution == "trace":
        return np.array([speeds[i % len(speeds)] for i in range(n)], dtype=float)
    raise ValueError(f"unknown straggler distribution {distribution!r}")
