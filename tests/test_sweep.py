"""Bandwidth-wall sweeps: the grid runs, the slow link costs more simulated time, files appear."""
import csv

from fedsim.cli import main


def test_sweep_grid_writes_csv_and_plot(tmp_path):
    rc = main(["sweep", "--bandwidths", "100kbps,10Mbps", "--algorithms", "fedavg,sgd", "--out", str(tmp_path),
               "--set", "run.rounds=2", "--set", "data.clients=4"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [(r["algorithm"], r["uplink"]) for r in rows] == [("fedavg", "100kbps"), ("fedavg", "10Mbps"),
                                                             ("sgd", "100kbps"), ("sgd", "10Mbps")]
    by = {(r["algorithm"], r["uplink"]): r for r in rows}
    for a in ("fedavg", "sgd"):
        # same work and bytes, a 100x slower uplink: much more simulated time
        assert by[(a, "100kbps")]["uplink_bytes"] == by[(a, "10Mbps")]["uplink_bytes"]
        assert float(by[(a, "100kbps")]["sim_time_s"]) > 10 * float(by[(a, "10Mbps")]["sim_time_s"])
    assert (tmp_path / "bandwidth_wall.png").stat().st_size > 10_000


def test_sweep_rejects_bad_bandwidth_before_running(tmp_path, capsys):
    assert main(["sweep", "--bandwidths", "10 parsecs", "--algorithms", "sgd", "--out", str(tmp_path)]) == 2
    assert "10 parsecs" in capsys.readouterr().err
