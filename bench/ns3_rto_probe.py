"""Where ns-3's 24 s for "N=8 1MB 10Mbps 50ms 0.1%" came from: a spurious-timeout loop.

The validation grid's case of 8 senders uploading 1 MB each through a 10 Mbps bottleneck
(RTT 100 ms, 0.1 % loss, a 100-packet drop-tail queue) took 24.3 s in ns-3 (median of 10
loss streams; 6.45-35.93 s) against fedsim's 6.8 s, with ns-3's default delayed-ACK timeout
of 200 ms. This probe runs the case (and its loss-free, 1- and 2-flow variants) through the
same ns-3 program as ``bench/validate_ns3.py``, with the receivers' delayed-ACK timeout at
ns-3's 200 ms and at Linux's 40 ms (TCP_ATO_MIN), and counts each sender's retransmission
timeouts (entries into CA_LOSS).

What it shows (and what a trace of cwnd, ACKs and retransmissions of the slow flow shows in
detail): the 8 flows' slow starts overflow the queue together; fast recovery repairs most
of it, but a flow whose retransmissions are lost again times out, and its window is then
one segment. A lone segment's ACK is delayed by the receiver for the full 200 ms, so it
returns after RTT + 200 ms, later than ns-3's RTO (max(200 ms, srtt + 4 rttvar), ~0.28 s
here): a spurious timeout, the window back to one segment, and the ACK that ends the loss
state does not grow it (ns-3 counts the segments acked beyond the recovery point: none). One
segment per ~0.38 s for the rest of the transfer: that flow takes ~150 s, the other seven
~6 s, the mean of the eight ~24 s, and it happens without any random loss too. Linux does
not do this: its delayed-ACK timeout starts at 40 ms and follows the inter-arrival time,
its RTO is srtt + max(4 rttvar, 200 ms), it undoes spurious timeouts (timestamps, F-RTO)
and it grows the window on every ACK in the loss state.

Needs ns-3, the optional extra of bench/validate_ns3.py (pip install '.[validate]').
Run: python bench/ns3_rto_probe.py        (about 1-2 minutes on 2 shared cores; the table is
                                            in docs/network-model.md section 10)
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from validate_ns3 import Ns3, fedsim_times  # noqa: E402

MB = 1000_000
SEEDS = range(1, 11)
# (label, senders, loss): the grid's case, loss-free, and with fewer senders
ROWS = [("N=8, no loss", 8, 0.0), ("N=8, 0.1%", 8, 0.001), ("N=2, 0.1%", 2, 0.001), ("N=1, 0.1%", 1, 0.001)]
SIZE, BW, DELAY = 1 * MB, 10e6, 0.050


def main() -> None:
    ns3 = Ns3()
    print(f"{'1MB each, 10Mbps, 50ms':<24} {'delack':>6} {'median s':>9} {'range s':>13} {'slowest flow s':>15}"
          f" {'most RTOs':>9} {'runs w/ a loop':>14} {'fedsim s':>9}")
    for label, n, loss in ROWS:
        extra = (0.0,) * n
        ours = sum(fedsim_times(n, SIZE, BW, DELAY, loss, extra)) / n
        for delack in (0.200, 0.040):
            means, slowest, most, loops = [], [], 0, 0
            seeds = SEEDS if loss > 0 else [1]
            for seed in seeds:
                times = ns3.run(n, SIZE, BW, DELAY, loss, extra, seed, delack=delack)
                rtos = ns3.timeouts()
                means.append(sum(times) / n)
                slowest.append(max(times))
                most = max(most, max(rtos))
                loops += max(rtos) >= 20    # a flow caught in the spurious-timeout loop
            print(f"{label:<24} {delack * 1e3:>4.0f}ms {statistics.median(means):>9.2f}"
                  f" {min(means):>6.2f}-{max(means):<6.2f} {statistics.median(slowest):>15.2f} {most:>9d}"
                  f" {loops:>8d}/{len(seeds):<5d} {ours:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
