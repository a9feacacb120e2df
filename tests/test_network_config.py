"""Units and the network sections' parser: good values in SI units, bad ones named."""
from __future__ import annotations

import math
import pathlib

import pytest
from hypothesis import given, settings, strategies as st

from network.config import default_config, parse_network
from network.errors import NetworkConfigError
from network.units import format_clients, parse_bandwidth, parse_clients, parse_duration, parse_size


@pytest.mark.parametrize("text, bps", [
    ("1Mbps", 1e6), ("100kbps", 1e5), ("1.5Gbps", 1.5e9), ("800bps", 800.0), (2_000_000, 2e6),
    ("10 Mbps", 1e7), ("1Mbit/s", 1e6), ("2MBps", 16e6), ("100Kbps", 1e5), (0.5, 0.5),
])
def test_bandwidth_units(text, bps):
    assert parse_bandwidth(text, "k") == pytest.approx(bps, rel=1e-12)


@pytest.mark.parametrize("text, s", [
    ("50ms", 0.05), ("2s", 2.0), ("1.5min", 90.0), ("1h", 3600.0), ("250us", 250e-6), (3, 3.0), ("0s", 0.0),
])
def test_duration_units(text, s):
    assert parse_duration(text, "k") == pytest.approx(s, rel=1e-12)


@pytest.mark.parametrize("text, b", [
    ("1500B", 1500), ("64KiB", 65536), ("10MB", 10_000_000), ("1GiB", 2**30), (42, 42), ("1kB", 1000),
])
def test_size_units(text, b):
    assert parse_size(text, "k") == b


@pytest.mark.parametrize("fn, value", [
    (parse_bandwidth, "-1Mbps"), (parse_bandwidth, "1 parsec"), (parse_bandwidth, "fast"), (parse_bandwidth, True),
    (parse_duration, "10 parsecs"), (parse_duration, "-2s"), (parse_duration, "ms"), (parse_duration, [1]),
    (parse_size, "1.5B"), (parse_size, "10Mb"), (parse_size, "-1B"),
])
def test_bad_units_name_key_and_value(fn, value):
    with pytest.raises(NetworkConfigError) as e:
        fn(value, "network.thing")
    assert e.value.key == "network.thing" and e.value.value == value
    assert "network.thing" in str(e.value) and repr(value) in str(e.value)


def test_clients_forms():
    assert parse_clients("0-4,7", 10, "k") == [0, 1, 2, 3, 4, 7]
    assert parse_clients(3, 10, "k") == [3]
    assert parse_clients([2, 1, 2], 10, "k") == [1, 2]
    assert parse_clients("all", 3, "k") == [0, 1, 2]
    with pytest.raises(NetworkConfigError, match="client 12 does not exist"):
        parse_clients("0-4,12", 10, "events[1].clients")
    with pytest.raises(NetworkConfigError, match="client 10 does not exist"):
        parse_clients("8-11", 10, "k")
    with pytest.raises(NetworkConfigError):
        parse_clients("4-2", 10, "k")


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(0, 60)))
def test_format_clients_round_trips(ids):
    if ids:
        assert parse_clients(format_clients(ids), 61, "k") == sorted(ids)


def test_defaults_are_the_modest_network():
    cfg = default_config(3)
    up, down = cfg.uplinks[0], cfg.downlinks[2]
    assert up.bandwidth == 10e6 and down.bandwidth == 50e6
    assert up.latency == down.latency == 0.02
    assert up.loss.rate == 0 and up.jitter.distribution == "none" and up.duplicate == up.corrupt == 0
    assert math.isinf(cfg.server_uplink) and math.isinf(cfg.server_downlink)
    assert cfg.transport == "tcp" and cfg.mss == 1448  # MTU - 52 (IPv4, TCP, timestamps)
    assert cfg.tcp.initial_window == 10 and cfg.tcp.slow_start_after_idle and cfg.tcp.congestion == "cubic"


def test_full_config_parses(tmp_path):
    (tmp_path / "lte.csv").write_text("time,bps\n0,1Mbps\n10s,200kbps\n20,5000000\n")
    sections = {
        "network": {
            "uplink": "lte.csv", "downlink": "10Mbps", "latency": "50ms",
            "jitter": {"distribution": "pareto", "scale": "5ms", "alpha": 3},
            "loss": {"model": "gilbert_elliott", "p": 0.01, "r": 0.25, "h": 0.1, "k": 0.999},
            "duplicate": 0.01, "corrupt": 0.001, "transport": "datagram", "mtu": "9000B",
            "server": {"uplink": "100Mbps", "downlink": "1Gbps"},
            "tcp": {"min_rto": "1s", "max_window": "64KiB", "delayed_ack": True},
            "group": [{"clients": "0-1", "direction": "up", "latency": "200ms", "uplink": "56kbps"}],
        },
        "stragglers": {"distribution": "lognormal", "sigma": 0.8, "speed": 2e9, "noise": 0.1},
        "availability": {"mean_online": "10min", "mean_offline": "1min", "clients": "2-3"},
        "events": [
            {"at": "120s", "action": "set_link", "clients": "0-2", "uplink": "100kbps", "loss": 0.05},
            {"at_round": 10, "action": "crash", "clients": "3", "restart_after": "30s"},
            {"at": "1min", "action": "loss_burst", "loss": 0.5, "duration": "5s", "direction": "down"},
            {"at_round": 2, "action": "slowdown", "clients": [1], "factor": 4},
            {"at": 5, "action": "partition", "clients": "1", "duration": "10s"},
        ],
    }
    cfg = parse_network(sections, 4, tmp_path)
    assert cfg.uplinks[0].bandwidth == 56e3 and cfg.uplinks[0].latency == 0.2
    assert cfg.downlinks[0].latency == 0.05                      # direction = "up" only
    tr = cfg.uplinks[2].bandwidth
    assert tr.times == (0.0, 10.0, 20.0) and tr.bps == (1e6, 2e5, 5e6)
    assert tr.at(15) == 2e5 and tr.at(25) == 5e6 and tr.next_change(10) == 20
    pi_bad = 0.01 / (0.01 + 0.25)
    assert cfg.uplinks[3].loss.rate == pytest.approx((1 - pi_bad) * 0.001 + pi_bad * 0.9, rel=1e-12)
    assert cfg.server_downlink == 1e9 and cfg.mtu == 9000 and cfg.tcp.b == 2 and cfg.tcp.max_window == 65536
    assert cfg.availability.clients == (2, 3) and cfg.availability.mean_online == 600
    ev = cfg.events
    assert ev[0].at == 120 and ev[0].up["bandwidth"] == 1e5 and ev[0].down["loss"].p == 0.05
    assert ev[1].at_round == 10 and ev[1].restart_after == 30
    assert ev[2].down["loss"].p == 0.5 and not ev[2].up and ev[2].duration == 5
    assert ev[3].factor == 4 and ev[4].duration == 10


@pytest.mark.parametrize("sections, key, value", [
    ({"network": {"uplink": "-5Mbps"}}, "network.uplink", "-5Mbps"),
    ({"network": {"uplink": 0}}, "network.uplink", 0),
    ({"network": {"loss": 1.5}}, "network.loss", 1.5),
    ({"network": {"loss": {"model": "ge", "p": 0.1, "r": 2}}}, "network.loss.r", 2),
    ({"network": {"jitter": {"distribution": "cauchy", "scale": "1ms"}}}, "network.jitter.distribution", "cauchy"),
    ({"stragglers": {"distribution": "weibull"}}, "stragglers.distribution", "weibull"),
    ({"network": {"latency": "10 parsecs"}}, "network.latency", "10 parsecs"),
    ({"network": {"uplnk": "1Mbps"}}, "network.uplnk", "1Mbps"),
    ({"network": {"server": {"uplink": "1Mbps", "speed": 3}}}, "network.server.speed", 3),
    ({"network": {"transport": "quic"}}, "network.transport", "quic"),
    ({"network": {"duplicate": "often"}}, "network.duplicate", "often"),
    ({"events": [{"at": "1s", "action": "crash", "clients": "2"},
                 {"at": "2s", "action": "crash", "clients": "0-4,9"}]}, "events[1].clients", "0-4,9"),
    ({"events": [{"at": "1s", "action": "explode"}]}, "events[0].action", "explode"),
    ({"events": [{"at": "1s", "action": "heal", "colour": "red"}]}, "events[0].colour", "red"),
    ({"events": [{"at": "1s", "action": "set_link", "latency": "1 fortnight"}]}, "events[0].latency", "1 fortnight"),
    ({"events": [{"at_round": -1, "action": "heal"}]}, "events[0].at_round", -1),
    ({"availability": {"mean_online": "1min", "mean_offline": "1 eon"}}, "availability.mean_offline", "1 eon"),
    ({"network": {"group": [{"clients": "7", "uplink": "1Mbps"}]}}, "network.group[0].clients", "7"),
])
def test_bad_input_names_key_and_value(sections, key, value):
    with pytest.raises(NetworkConfigError) as e:
        parse_network(sections, 5, pathlib.Path("."))
    assert e.value.key == key
    assert e.value.value == value
    assert key in str(e.value)


def test_event_needs_exactly_one_time():
    for ev in ({"action": "heal"}, {"action": "heal", "at": "1s", "at_round": 2}):
        with pytest.raises(NetworkConfigError) as e:
            parse_network({"events": [ev]}, 2, pathlib.Path("."))
        assert e.value.key == "events[0]"


def test_trace_must_be_monotonic(tmp_path):
    (tmp_path / "bad.csv").write_text("time,bps\n0,1Mbps\n5,2Mbps\n5,3Mbps\n")
    with pytest.raises(NetworkConfigError) as e:
        parse_network({"network": {"downlink": {"trace": "bad.csv"}}}, 2, tmp_path)
    assert e.value.key == "network.downlink.trace" and e.value.value == "bad.csv"
    assert "line 4" in e.value.reason and "increase" in e.value.reason
    (tmp_path / "neg.csv").write_text("0,1Mbps\n5,-2Mbps\n")
    with pytest.raises(NetworkConfigError, match="line 2"):
        parse_network({"network": {"uplink": "neg.csv"}}, 2, tmp_path)
    with pytest.raises(NetworkConfigError, match="cannot read"):
        parse_network({"network": {"uplink": "missing.csv"}}, 2, tmp_path)
