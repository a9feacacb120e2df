"""The small stochastic and analytic models of a link, as pure functions and one tiny
stateful chain. Every function takes its ``numpy.random.Generator`` explicitly.

Units: sizes in bytes, rates in bits/s, times in seconds, probabilities in [0, 1].
"""
from __future__ import annotations

import math
from typing import Callable

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


CUBIC_C = 0.4        # Linux CUBIC's scaling constant, segments / s^3
CUBIC_BETA = 0.7     # Linux CUBIC's multiplicative decrease (RFC 9438 beta_cubic)
RENO_BETA = 0.5


def cubic_window(rtt: float, p: float, c: float = CUBIC_C, beta: float = CUBIC_BETA) -> float:
    """CUBIC's average congestion window (segments) under periodic loss with probability p
    (RFC 8312 section 5.1 / RFC 9438): the larger of the cubic region

        W = (C (3 + beta) / (4 (1 - beta)))^(1/4) * (RTT / p)^(3/4)

    and the Reno-friendly region sqrt(3 / (2p)) (Linux's tcp_friendliness, on by default;
    alpha = 3 (1 - beta) / (1 + beta) makes CUBIC's AIMD estimate match Reno). inf if p = 0."""
    if p <= 0:
        return math.inf
    w_cubic = (c * (3.0 + beta) / (4.0 * (1.0 - beta))) ** 0.25 * (max(rtt, 0.0) / p) ** 0.75
    return max(w_cubic, math.sqrt(1.5 / p))


def cubic_rate(mss: int, rtt: float, p: float, wmax_bytes: float = math.inf) -> float:
    """CUBIC's response function in bits/s: ``cubic_window(rtt, p)`` segments of ``mss``
    bytes per round trip, at most the receive window ``wmax_bytes`` per round trip."""
    if rtt <= 0:
        return math.inf
    window = math.inf if not math.isfinite(wmax_bytes) else 8.0 * wmax_bytes / rtt
    return min(window, 8.0 * mss * cubic_window(rtt, p) / rtt)


class TcpWindow:
    """The congestion window of one TCP sender, stepped once per round trip (flow level).

    ``cwnd`` and ``ssthresh`` in segments. Loss is mean-field: every ``1/p`` segments sent
    is one loss, and a loss with the losses among the segments in flight when it is
    detected (the round's) is one loss event (one SACK recovery, one window reduction):
    events come every ``1/p + W`` segments, so a long transfer converges to the response
    function (``cubic_window``; Mathis' sqrt(3/2p) for Reno) at the loss event rate
    (``loss_event_rate``), while a short one keeps the window slow start gave it. A loss
    event is a retransmission timeout with Padhye's probability Q(w) = min(1, 3/w): the connection
    stalls for that share of the RTO (in expectation; backoff is not modelled).
    """

    __slots__ = ("iw", "congestion", "b", "max_cwnd", "cwnd", "ssthresh", "w_max", "epoch", "origin", "k",
                 "acc", "w_est")

    def __init__(self, iw: int, congestion: str = "cubic", b: int = 1, max_cwnd: float = math.inf):
        self.iw, self.congestion, self.b, self.max_cwnd = float(iw), congestion, b, max_cwnd
        self.cwnd = min(float(iw), max_cwnd)
        self.ssthresh = math.inf
        self.w_max = 0.0
        self.epoch: float | None = None   # CUBIC: start of the current growth epoch, seconds
        self.origin = 0.0
        self.k = 0.0
        self.w_est = 0.0
        # Expected losses since the last loss event. Starting half-way rounds the count of
        # loss events in n segments to the nearest integer of n*p (a uniform loss phase).
        self.acc = 0.5

    def restart_after_idle(self, idle: float, rto: float) -> None:
        """Linux's tcp_cwnd_restart: after ``idle`` seconds without sending (> ``rto``) the
        window is halved once per RTO elapsed, down to the initial window; ssthresh keeps
        3/4 of the old window."""
        if idle <= rto:
            return
        self.ssthresh = max(self.ssthresh if math.isfinite(self.ssthresh) else 0.0, 0.75 * self.cwnd)
        restart = min(self.iw, self.cwnd)
        cwnd = self.cwnd
        delta = idle - rto
        while delta > 0 and cwnd > restart:
            cwnd /= 2.0
            delta -= rto
        self.cwnd = max(cwnd, restart)
        self.epoch = None

    def loss_due(self, sent: float, p: float) -> bool:
        """Whether ``sent`` more segments would reach the next mean-field loss event."""
        return p > 0 and self.acc + sent * p >= 1.0

    def timeout_probability(self) -> float:
        """Padhye et al.'s Q(w) = min(1, 3/w): the chance that a loss in a window of w
        segments leaves too few duplicate ACKs for fast retransmit (a retransmission
        timeout instead)."""
        return min(1.0, 3.0 / max(self.cwnd, 1.0))

    def on_round(self, sent: float, p: float, now: float, rtt: float, ceiling: float = math.inf) -> float:
        """A round trip ended at ``now`` (seconds) in which ``sent`` segments left; update
        the window. ``ceiling`` (segments) is the most window the path holds: its
        bandwidth-delay product at the flow's rate plus a buffer of as much (a larger
        window would overflow a drop-tail queue). Returns the probability that the round's
        loss event (if any) was a retransmission timeout (0 without one): the caller stalls
        the connection for that share of the RTO, the mean-field form of Padhye's timeout
        term."""
        if p > 0:
            self.acc += sent * p
        if self.acc >= 1.0:
            # The loss opens a recovery episode, and the segments already in flight when it
            # is detected (this round's) belong to it: their losses are repaired in the same
            # recovery, with one window reduction (RFC 6675; Linux's recovery point). So
            # the next episode is due 1/p segments after those: episodes come every
            # 1/p + W segments, the loss *event* rate p / (1 + pW) (``loss_event_rate``).
            self.acc = self.acc % 1.0 - sent * p
            if self.cwnd < self.ssthresh:
                # Detected a round trip after the loss: slow start grew the window meanwhile.
                self.cwnd = min(self.cwnd + sent, max(ceiling, self.cwnd))
            # Mid-stream, SACK and limited transmit repair a loss by fast retransmit unless
            # the window is too small for three duplicate ACKs: then it is a timeout.
            q = 1.0 if self.cwnd < 4.0 else 0.0
            beta = CUBIC_BETA if self.congestion == "cubic" else RENO_BETA
            if self.congestion == "cubic" and self.cwnd < self.w_max:
                self.w_max = self.cwnd * (1.0 + beta) / 2.0   # fast convergence
            else:
                self.w_max = self.cwnd
            self.ssthresh = max(2.0, self.cwnd * beta)
            self.cwnd = self.ssthresh
            self.epoch = None
            return q
        if sent <= 0:
            return 0.0
        if self.cwnd < self.ssthresh:               # slow start: one segment per segment acked
            self.cwnd = min(self.cwnd + sent, max(self.ssthresh, self.cwnd))
        else:
            frac = min(1.0, sent / self.cwnd)       # grow only while the window is used
            if self.congestion == "reno":
                self.cwnd += frac / self.b
            else:
                self.cwnd += frac * self._cubic_step(now, rtt)
        self.cwnd = min(self.cwnd, self.max_cwnd, max(ceiling, self.iw))
        return 0.0

    def _cubic_step(self, now: float, rtt: float) -> float:
        """Linux's bictcp_update over one round trip: the cubic target one RTT ahead, or the
        Reno-friendly estimate when larger; at most +50% per round trip."""
        if self.epoch is None:
            self.epoch = now - rtt
            if self.w_max <= self.cwnd:
                self.k, self.origin = 0.0, self.cwnd
            else:
                self.k = ((self.w_max - self.cwnd) / CUBIC_C) ** (1.0 / 3.0)
                self.origin = self.w_max
            self.w_est = self.cwnd
        t = now - self.epoch
        target = self.origin + CUBIC_C * (t + rtt - self.k) ** 3
        self.w_est += 3.0 * (1.0 - CUBIC_BETA) / (1.0 + CUBIC_BETA)   # per round trip, as Reno's +1
        goal = max(target, self.w_est)
        return min(max(goal - self.cwnd, 0.0), self.cwnd / 2.0)


def loss_event_rate(p: float, window: "Callable[[float], float]") -> float:
    """Loss events per segment sent, for independent packet loss ``p`` and a SACK sender whose
    window (segments per round trip) at loss event rate ``q`` is ``window(q)``.

    A loss opens a recovery episode that the segments in flight when it is detected, one
    window ``W``, join (their losses are repaired by the same recovery, with one window
    reduction); the next episode starts with the next loss after them, ``1/p`` segments on
    in expectation. So episodes come every ``1/p + W`` segments:

        p_e = p / (1 + p W(p_e))          (the fixed point; a contraction: W ~ p_e^-1/2..-3/4)

    (RFC 5348's loss event rate: losses within a round trip of the first are one event.)
    With Reno's W = sqrt(3/(2 p_e)) it is closed form: sqrt(p_e) = (sqrt(1.5 p^2 + 4p) -
    p sqrt(1.5)) / 2. 0 for p <= 0; 1 for p >= 1."""
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    q = p
    for _ in range(200):
        w = window(q)
        nxt = p / (1.0 + p * w) if math.isfinite(w) else 0.0
        if abs(nxt - q) <= 1e-13 * q:
            return nxt
        q = nxt
    return q


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
