"""fedsim's TCP transfer model against the ns-3 packet-level simulator.

Each case: N senders upload one message each, all starting at once, through one shared
bottleneck to one receiver. ns-3 (the ``ns3`` package, ``pip install .[validate]``) runs it
packet by packet: point-to-point links, a drop-tail queue of max(1 BDP, 100) packets at the
bottleneck, TCP CUBIC with HyStart as ns-3 ships it, MSS 1448 (timestamps on, 52-byte
headers), initial window 10, SACK, min RTO 200 ms, delayed ACKs every 2 segments or 40 ms
(Linux's minimum ACK timeout; ns-3's default 200 ms sends a one-segment window into spurious
timeouts, see bench/ns3_rto_probe.py), loss as independent packet drops on the bottleneck's
data direction. Every sender opens a new connection (its SYN round trip counts).
Access links run at 100x the bottleneck rate, with per-sender extra one-way delays for the
unequal-RTT cases. fedsim runs the same case through its ``Emulator`` (server downlink =
the bottleneck, client links = the access links, ``set_security("tcp")``: a bare TCP
handshake).

A case's figure is the mean completion time of its N transfers (connect to last byte at
the receiver), in seconds. Lossy cases run ns-3 with ``--seeds`` loss streams (10) and take
the median (fedsim's loss model is mean-field: it predicts a typical run; ns-3's runs have a
heavy tail of repeated, exponentially backed-off retransmission timeouts, printed as the
range). The last line is the mean and the max absolute
relative error of fedsim against ns-3.

Run: python bench/validate_ns3.py                  (4-6 minutes on 2 shared cores, 1-4 of them
                                                     loading ns-3)
     python bench/validate_ns3.py --cache FILE      (reuse/store the ns-3 figures in FILE)
     python bench/validate_ns3.py --fedsim-only --cache bench/validate_ns3_reference.json
                                                    (fedsim's side against the stored ns-3 runs
                                                     that docs/network-model.md reports; no ns-3)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from network.config import parse_network
from network.emulator import Emulator
from network.simclock import HeapClock

KB, MB = 1000, 1000_000
Mbps = 1e6

# (label, N, size bytes, bottleneck bits/s, one-way delay s, loss, extra one-way delay per sender, s)
CASES: list[tuple[str, int, int, float, float, float, tuple[float, ...]]] = [
    ("20KB 10Mbps 25ms", 1, 20 * KB, 10 * Mbps, 0.025, 0.0, (0,)),
    ("20KB 100Mbps 1ms", 1, 20 * KB, 100 * Mbps, 0.001, 0.0, (0,)),
    ("20KB 1000Mbps 100ms", 1, 20 * KB, 1000 * Mbps, 0.100, 0.0, (0,)),
    ("200KB 10Mbps 10ms", 1, 200 * KB, 10 * Mbps, 0.010, 0.0, (0,)),
    ("200KB 100Mbps 50ms", 1, 200 * KB, 100 * Mbps, 0.050, 0.0, (0,)),
    ("640KB 1Mbps 25ms", 1, 640 * KB, 1 * Mbps, 0.025, 0.0, (0,)),
    ("640KB 100Mbps 25ms", 1, 640 * KB, 100 * Mbps, 0.025, 0.0, (0,)),
    ("2MB 1Mbps 10ms", 1, 2 * MB, 1 * Mbps, 0.010, 0.0, (0,)),
    ("2MB 1000Mbps 50ms", 1, 2 * MB, 1000 * Mbps, 0.050, 0.0, (0,)),
    ("6.4MB 100Mbps 25ms", 1, 6400 * KB, 100 * Mbps, 0.025, 0.0, (0,)),
    ("10MB 10Mbps 50ms", 1, 10 * MB, 10 * Mbps, 0.050, 0.0, (0,)),
    ("10MB 100Mbps 100ms", 1, 10 * MB, 100 * Mbps, 0.100, 0.0, (0,)),
    ("10MB 1000Mbps 10ms", 1, 10 * MB, 1000 * Mbps, 0.010, 0.0, (0,)),
    ("20KB 10Mbps 25ms 1%", 1, 20 * KB, 10 * Mbps, 0.025, 0.01, (0,)),
    ("200KB 10Mbps 25ms 1%", 1, 200 * KB, 10 * Mbps, 0.025, 0.01, (0,)),
    ("2MB 10Mbps 25ms 0.1%", 1, 2 * MB, 10 * Mbps, 0.025, 0.001, (0,)),
    ("2MB 10Mbps 50ms 1%", 1, 2 * MB, 10 * Mbps, 0.050, 0.01, (0,)),
    ("6.4MB 100Mbps 25ms 0.1%", 1, 6400 * KB, 100 * Mbps, 0.025, 0.001, (0,)),
    ("10MB 100Mbps 10ms 1%", 1, 10 * MB, 100 * Mbps, 0.010, 0.01, (0,)),
    ("10MB 1000Mbps 50ms 0.1%", 1, 10 * MB, 1000 * Mbps, 0.050, 0.001, (0,)),
    ("N=2 2MB 10Mbps 25ms", 2, 2 * MB, 10 * Mbps, 0.025, 0.0, (0, 0)),
    ("N=2 10MB 1000Mbps 1ms", 2, 10 * MB, 1000 * Mbps, 0.001, 0.0, (0, 0)),
    ("N=2 2MB 100Mbps 10ms, +0/+40ms", 2, 2 * MB, 100 * Mbps, 0.010, 0.0, (0, 0.040)),
    ("N=8 200KB 10Mbps 25ms", 8, 200 * KB, 10 * Mbps, 0.025, 0.0, (0,) * 8),
    ("N=8 2MB 100Mbps 25ms", 8, 2 * MB, 100 * Mbps, 0.025, 0.0, (0,) * 8),
    ("N=8 2MB 100Mbps 10ms, +0..70ms", 8, 2 * MB, 100 * Mbps, 0.010, 0.0, tuple(0.010 * i for i in range(8))),
    ("N=8 200KB 1000Mbps 5ms, +0..35ms", 8, 200 * KB, 1000 * Mbps, 0.005, 0.0, tuple(0.005 * i for i in range(8))),
    ("N=8 1MB 10Mbps 50ms 0.1%", 8, 1 * MB, 10 * Mbps, 0.050, 0.001, (0,) * 8),
]

NS3_PROGRAM = r'''
#include "ns3/core-module.h"
#include "ns3/network-module.h"
#include "ns3/internet-module.h"
#include "ns3/point-to-point-module.h"
#include "ns3/applications-module.h"
#include "ns3/traffic-control-module.h"
namespace fedsim_validate {
using namespace ns3;
static std::vector<double> g_rx, g_need, g_done, g_rto;
static void OnRx(uint32_t i, Ptr<const Packet> p, const Address &) {
  g_rx[i] += p->GetSize();
  if (g_done[i] < 0 && g_rx[i] >= g_need[i]) g_done[i] = Simulator::Now().GetSeconds();
}
// A retransmission timeout: ns-3 enters CA_LOSS only from its RTO handler.
static void OnCongState(uint32_t i, TcpSocketState::TcpCongState_t, TcpSocketState::TcpCongState_t now) {
  if (now == TcpSocketState::CA_LOSS) g_rto[i] += 1;
}
static void HookSockets(uint32_t n) {   // the senders' sockets exist once their apps started
  for (uint32_t i = 0; i < n; i++) {
    std::ostringstream path; path << "/NodeList/" << i << "/$ns3::TcpL4Protocol/SocketList/0/CongState";
    Config::ConnectWithoutContext(path.str(), MakeBoundCallback(&OnCongState, i));
  }
}
// Retransmission timeouts of each sender in the last run().
std::vector<double> timeouts() { return g_rto; }
// Completion time (s since the connect) of each sender's transfer; -1 if it did not finish.
// delack: the receivers' delayed-ACK timeout, s.
std::vector<double> run(double bw, double delay, double loss, std::vector<double> extra, double bytes,
                        uint32_t seed, double qpkts, double delack) {
  uint32_t n = extra.size();
  RngSeedManager::SetSeed(1); RngSeedManager::SetRun(seed);
  Config::SetDefault("ns3::TcpL4Protocol::SocketType", StringValue("ns3::TcpCubic"));
  Config::SetDefault("ns3::TcpSocket::SegmentSize", UintegerValue(1448));
  Config::SetDefault("ns3::TcpSocket::InitialCwnd", UintegerValue(10));
  Config::SetDefault("ns3::TcpSocket::SndBufSize", UintegerValue(1u << 27));
  Config::SetDefault("ns3::TcpSocket::RcvBufSize", UintegerValue(1u << 27));
  Config::SetDefault("ns3::TcpSocketBase::MinRto", TimeValue(MilliSeconds(200)));
  Config::SetDefault("ns3::TcpSocket::TcpNoDelay", BooleanValue(true));   // as ZeroMQ sets it
  // delack: 40 ms in the grid (see DELACK_S in validate_ns3.py)
  Config::SetDefault("ns3::TcpSocket::DelAckTimeout", TimeValue(Seconds(delack)));
  NodeContainer s; s.Create(n); NodeContainer r; r.Create(1); NodeContainer d; d.Create(1);
  InternetStackHelper st; st.Install(s); st.Install(r); st.Install(d);
  PointToPointHelper bott;
  bott.SetDeviceAttribute("DataRate", DataRateValue(DataRate((uint64_t)bw)));
  bott.SetChannelAttribute("Delay", TimeValue(Seconds(delay)));
  bott.SetQueue("ns3::DropTailQueue<Packet>", "MaxSize",
                QueueSizeValue(QueueSize(QueueSizeUnit::PACKETS, (uint32_t)qpkts)));
  NetDeviceContainer bd = bott.Install(r.Get(0), d.Get(0));
  Ipv4AddressHelper a; a.SetBase("10.0.0.0", "255.255.255.0");
  Ipv4InterfaceContainer di = a.Assign(bd);
  TrafficControlHelper tch; tch.Uninstall(bd);
  if (loss > 0) {
    Ptr<RateErrorModel> em = CreateObject<RateErrorModel>();
    em->SetAttribute("ErrorRate", DoubleValue(loss));
    em->SetAttribute("ErrorUnit", EnumValue(RateErrorModel::ERROR_UNIT_PACKET));
    em->AssignStreams(7);   // the same loss stream whatever ran before in this process
    bd.Get(1)->SetAttribute("ReceiveErrorModel", PointerValue(em));
  }
  g_rx.assign(n, 0); g_need.assign(n, bytes); g_done.assign(n, -1); g_rto.assign(n, 0);
  for (uint32_t i = 0; i < n; i++) {
    PointToPointHelper acc;
    acc.SetDeviceAttribute("DataRate", DataRateValue(DataRate((uint64_t)(bw * 100))));
    acc.SetChannelAttribute("Delay", TimeValue(Seconds(extra[i])));
    acc.SetQueue("ns3::DropTailQueue<Packet>", "MaxSize", QueueSizeValue(QueueSize("100000p")));
    NetDeviceContainer ad = acc.Install(s.Get(i), r.Get(0));
    std::ostringstream base; base << "10.1." << (i + 1) << ".0";
    a.SetBase(base.str().c_str(), "255.255.255.0");
    a.Assign(ad);
    tch.Uninstall(ad);
    uint16_t port = 5000 + i;
    BulkSendHelper bs("ns3::TcpSocketFactory", InetSocketAddress(di.GetAddress(1), port));
    bs.SetAttribute("MaxBytes", UintegerValue((uint64_t)bytes));
    bs.SetAttribute("SendSize", UintegerValue(1448 * 8));
    ApplicationContainer sa = bs.Install(s.Get(i)); sa.Start(Seconds(1.0));
    PacketSinkHelper sk("ns3::TcpSocketFactory", InetSocketAddress(Ipv4Address::GetAny(), port));
    ApplicationContainer ka = sk.Install(d.Get(0)); ka.Start(Seconds(0.5));
    ka.Get(0)->TraceConnectWithoutContext("Rx", MakeBoundCallback(&OnRx, i));
  }
  Simulator::Schedule(Seconds(1.0) + NanoSeconds(1), &HookSockets, n);
  Ipv4GlobalRoutingHelper::PopulateRoutingTables();
  Simulator::Stop(Seconds(3600));
  Simulator::Run();
  Simulator::Destroy();
  std::vector<double> out;
  for (uint32_t i = 0; i < n; i++) out.push_back(g_done[i] < 0 ? -1.0 : g_done[i] - 1.0);
  return out;
}
}
'''


# The receivers' delayed-ACK timeout, seconds: Linux's for a bulk receiver, TCP_ATO_MIN = 40 ms
# (its ACK timeout only grows toward the segments' inter-arrival time, capped by the RTT),
# not ns-3's default 200 ms. With 200 ms a flow whose window fell to one segment waits
# RTT + 200 ms for each ACK, longer than ns-3's RTO (max(min_rto, srtt + 4 rttvar); Linux's
# is srtt + max(4 rttvar, 200 ms), and Linux undoes a spurious timeout): a spurious timeout
# per segment, ~0.4 s each, for the rest of the transfer. bench/ns3_rto_probe.py shows it.
DELACK_S = 0.040


def queue_packets(bw: float, delay: float, extra: tuple[float, ...]) -> int:
    """The bottleneck's drop-tail queue: one bandwidth-delay product (longest path), at
    least ns-3's default 100 packets."""
    rtt = 2.0 * (delay + max(extra))
    return max(100, int(bw * rtt / 8 / 1500))


class Ns3:
    def __init__(self):
        t = time.perf_counter()
        try:
            from ns import ns  # noqa: F401  (loads the libraries and headers)
            import cppyy
        except ImportError as exc:   # pragma: no cover - the optional extra is missing
            raise SystemExit(f"ns-3 is not installed ({exc}); pip install '.[validate]'") from None
        cppyy.cppdef(NS3_PROGRAM)
        self.cppyy = cppyy
        print(f"# ns-3 loaded in {time.perf_counter() - t:.0f} s", flush=True)

    def run(self, n, size, bw, delay, loss, extra, seed, delack: float = DELACK_S) -> list[float]:
        """Each sender's completion time, seconds (``timeouts()`` then gives its RTO count)."""
        vec = self.cppyy.gbl.std.vector["double"]
        out = list(self.cppyy.gbl.fedsim_validate.run(bw, delay, loss, vec(list(extra)), float(size), seed,
                                                      float(queue_packets(bw, delay, extra)), float(delack)))
        if any(t < 0 for t in out):
            raise RuntimeError(f"ns-3: a transfer did not finish ({out})")
        return out

    def timeouts(self) -> list[int]:
        """Retransmission timeouts of each sender in the last :meth:`run`."""
        return [int(x) for x in self.cppyy.gbl.fedsim_validate.timeouts()]


def fedsim_times(n, size, bw, delay, loss, extra) -> list[float]:
    """The same case through fedsim's emulator: uploads from n clients into a server
    downlink of ``bw``; each client's links at 100x ``bw`` with the path's latency; loss on
    the data direction."""
    groups = [{"clients": str(i), "latency": f"{(delay + extra[i]) * 1e3:.6f}ms"} for i in range(n)]
    groups.append({"clients": "all", "loss": loss, "direction": "up"})
    sections = {"network": {"uplink": f"{bw * 100:.0f}bps", "downlink": f"{bw * 100:.0f}bps",
                            "server": {"downlink": f"{bw:.0f}bps"}, "group": groups}}
    clock = HeapClock()
    em = Emulator(parse_network(sections, n, Path(".")), n, clock, 1, lambda *a, **k: None)
    em.set_security("tcp")
    done: dict[int, float] = {}
    for c in range(n):
        em.transfer("up", c, size, lambda corrupt, c=c: done.setdefault(c, clock.now()))
    clock.run()
    return [done[c] for c in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10, help="ns-3 runs averaged per lossy case (default 10)")
    ap.add_argument("--cache", type=Path, help="JSON file: ns-3 figures are read from it when present, stored in it")
    ap.add_argument("--fedsim-only", action="store_true", help="take every ns-3 figure from --cache")
    args = ap.parse_args()
    cache: dict[str, float] = {}
    if args.cache is not None and args.cache.exists():
        cache = json.loads(args.cache.read_text())
    ns3 = None
    t0 = time.perf_counter()
    errors: list[float] = []
    print(f"{'case':<34} {'ns-3 s':>9} {'fedsim s':>9} {'ratio':>6}  ns-3 range over seeds")
    for label, n, size, bw, delay, loss, extra in CASES:
        seeds = args.seeds if loss > 0 else 1
        key = f"{label}|seeds={seeds}"
        runs = cache.get(key)
        if runs is None:
            if args.fedsim_only:
                raise SystemExit(f"no ns-3 figure for {label!r} in {args.cache}")
            if ns3 is None:
                ns3 = Ns3()
            runs = [sum(ns3.run(n, size, bw, delay, loss, extra, seed)) / n for seed in range(1, seeds + 1)]
            cache[key] = runs
            if args.cache is not None:
                args.cache.write_text(json.dumps(cache, indent=1))
        ref = statistics.median(runs)
        ours = sum(fedsim_times(n, size, bw, delay, loss, extra)) / n
        errors.append(abs(ours / ref - 1.0))
        spread = f"{min(runs):.2f}-{max(runs):.2f}" if len(runs) > 1 else ""
        print(f"{label:<34} {ref:>9.4f} {ours:>9.4f} {ours / ref:>6.2f}  {spread}", flush=True)
    print(f"# {len(CASES)} cases in {time.perf_counter() - t0:.0f} s")
    print(f"mean_abs_error={sum(errors) / len(errors):.3f} max_abs_error={max(errors):.3f}")


if __name__ == "__main__":
    main()
