"""``fedsim`` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import DataError, ScenarioError

EPILOG = """examples:
  fedsim run                                   # the embedded default: digits, 20 clients, fedavg
  fedsim run scenarios/lossy_uplink.toml --out runs/lossy
  fedsim run --set algorithm.name=qrr --set algorithm.bits=8 --set network.uplink=1Mbps
  fedsim run --set data.dataset=fashion-mnist --set model.hidden=[200] --set run.rounds=50
  fedsim sweep --bandwidths 100kbps,1Mbps,10Mbps --algorithms sgd,qrr,lqsgd --set run.rounds=30

--set takes the scenario's dotted keys; values parse as TOML values (1, 0.5, [64, 32],
true, "text"), bare words as strings. Units: bandwidth in bps/kbps/Mbps/Gbps, durations
in us/ms/s/min/h."""


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .runner import run
    from .scenario import load_scenario

    console = Console(stderr=True)
    try:
        scenario = load_scenario(args.scenario, args.set or [])
    except ScenarioError as exc:
        console.print(f"[red]scenario error:[/red] {exc}")
        return 2
    live = sys.stderr.isatty() and not args.quiet

    def line(m, total):
        acc = "-" if m.accuracy is None else f"{m.accuracy:.4f}"
        print(f"round {m.round + 1}/{total}  acc {acc}  sim {m.sim_time_s:.2f}s  "
              f"up {_fmt_bytes(m.uplink_bytes)}  down {_fmt_bytes(m.downlink_bytes)}", file=sys.stderr, flush=True)

    try:
        if live:
            with Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
                          TextColumn("acc {task.fields[acc]}  sim {task.fields[sim]}  up {task.fields[up]}  down {task.fields[down]}"),
                          TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task("run", total=scenario.run.rounds, acc="-", sim="0s", up="0 B", down="0 B")

                def update(m, total):
                    bar.update(task, completed=m.round + 1,
                               acc="-" if m.accuracy is None else f"{m.accuracy:.4f}",
                               sim=f"{m.sim_time_s:.1f}s", up=_fmt_bytes(m.uplink_bytes), down=_fmt_bytes(m.downlink_bytes))
                result = run(scenario, args.out, progress=update)
        else:
            result = run(scenario, args.out, progress=None if args.quiet else line)
    except (DataError, ScenarioError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    s = result.summary
    table = Table(title=f"{s['algorithm']} · {s['dataset']} · {s['clients']} clients · seed {s['seed']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    acc = s["final_accuracy"]
    rows = [
        ("final accuracy", "-" if acc is None else f"{acc:.4f}"),
        ("rounds", str(s["rounds"])),
        ("simulated time", f"{s['sim_time_s']:.2f} s"),
        ("wall time", f"{s['wall_time_s']:.2f} s"),
        (f"time to {s['target_accuracy']}", "not reached" if s["time_to_target_s"] is None else f"{s['time_to_target_s']:.2f} s"),
        ("uplink", _fmt_bytes(s["uplink_bytes"])),
        ("downlink", _fmt_bytes(s["downlink_bytes"])),
        ("payload bits (up+down)", f"{s['payload_bits']:,}"),
        ("model sha256", s["model_sha256"][:16] + "…"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    for k, v in s["counters"].items():
        table.add_row(f"count: {k}", str(v))
    Console().print(table)
    if args.out:
        console.print(f"results in {Path(args.out)}/ (summary.json, metrics.csv, events.jsonl)")
    if s.get("interrupted"):
        console.print(f"interrupted after {s['rounds']} rounds: the results above are partial")
        return 130
    return 0


def _load(args, console):
    from .scenario import load_scenario
    try:
        return load_scenario(args.scenario, args.set or [])
    except ScenarioError as exc:
        console.print(f"[red]scenario error:[/red] {exc}")
        return None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .deploy import serve
    console = Console(stderr=True, soft_wrap=True)
    scenario = _load(args, console)
    if scenario is None:
        return 2
    if scenario.run.clock != "real":
        _say("note: serve runs on the wall clock (run.clock = real)")
        scenario.run.clock = "real"
    if args.no_emulate:
        scenario.run.emulate = False
    if args.wait <= 0:
        _say(f"error: --wait {args.wait:g}: must be > 0 seconds")
        return 2

    def line(m, total):
        acc = "-" if m.accuracy is None else f"{m.accuracy:.4f}"
        print(f"round {m.round + 1}/{total}  acc {acc}  time {m.sim_time_s:.2f}s  up {_fmt_bytes(m.uplink_bytes)}",
              file=sys.stderr, flush=True)

    result = serve(scenario, args.bind, keys=args.keys, out_dir=args.out, progress=line, resume=args.resume,
                   ready=lambda addr: _say(f"listening on {addr}; waiting for {scenario.data.clients} clients"
                                           f"{'' if scenario.run.emulate else ' (network model off: the link is real)'}"),
                   registration_timeout=args.wait, say=_say)
    s = result.summary
    acc = "-" if s["final_accuracy"] is None else f"{s['final_accuracy']:.4f}"
    print(f"final_accuracy={acc} rounds={s['rounds']} uplink_bytes={s['uplink_bytes']} "
          f"downlink_bytes={s['downlink_bytes']} restarts={s['restarts']} model_sha256={s['model_sha256']}")
    return 130 if s.get("interrupted") else 0


def cmd_join(args: argparse.Namespace) -> int:
    from rich.console import Console

    from network.units import parse_clients

    from .deploy import join
    console = Console(stderr=True, soft_wrap=True)
    scenario = _load(args, console)
    if scenario is None:
        return 2
    scenario.run.clock = "real"
    ids = parse_clients(args.clients, scenario.data.clients, "--clients")
    if args.wait <= 0:
        _say(f"error: --wait {args.wait:g}: must be > 0 seconds")
        return 2
    result = join(scenario, args.connect, ids, keys=args.keys, key_name=args.key_name, wait=args.wait, say=_say)
    counters = ", ".join(f"{k} {v}" for k, v in sorted(result.stats.counters.items())) or "none"
    print(f"clients {args.clients}: done; contributed to {result.rounds_contributed} rounds; counters: {counters}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from .identity import make_keys, parse_id_blocks
    console = None
    n_clients = None
    if args.scenario is not None or args.set or not args.ids:
        from rich.console import Console
        console = Console(stderr=True, soft_wrap=True)
        scenario = _load(args, console)
        if scenario is None:
            return 2
        n_clients = scenario.data.clients
    blocks = parse_id_blocks(args.ids, n_clients or 10**9) if args.ids else None
    d = make_keys(args.directory, args.clients, blocks, n_clients)
    print(f"CURVE keys in {d}: server.key (public, give to clients), server.key_secret (server only), "
          f"clients/client-i.key[_secret] (i < {args.clients}), manifest.json (which ids each key may host)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from network.errors import NetworkConfigError

    from .sweep import sweep, write
    console = Console(stderr=True)
    bandwidths = [b.strip() for b in args.bandwidths.split(",") if b.strip()]
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]

    def progress(cell, i, n):
        s = cell.summary
        ttt = "not reached" if s["time_to_target_s"] is None else f"{s['time_to_target_s']:.1f}s"
        print(f"[{i}/{n}] {cell.algorithm:9s} uplink {cell.uplink:>8s}: acc {s['final_accuracy']:.4f}, "
              f"time to target {ttt}, up {_fmt_bytes(s['uplink_bytes'])}", file=sys.stderr, flush=True)

    try:
        cells = sweep(args.scenario, bandwidths, algorithms, args.set or [], progress)
    except (ScenarioError, NetworkConfigError, DataError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    table = Table(title="bandwidth wall: simulated time to target accuracy (s)")
    table.add_column("algorithm")
    for bw in bandwidths:
        table.add_column(bw, justify="right")
    for a in algorithms:
        row = [c for c in cells if c.algorithm == a]
        table.add_row(a, *["-" if c.summary["time_to_target_s"] is None else f"{c.summary['time_to_target_s']:.1f}"
                           for c in row])
    Console().print(table)
    paths = write(cells, args.out, cells[0].summary["target_accuracy"] if cells else None)
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_scenarios(args: argparse.Namespace) -> int:
    from .scenario import SCENARIO_DIR
    for path in sorted(SCENARIO_DIR.glob("*.toml")):
        first = next((l.lstrip("# ").strip() for l in path.read_text().splitlines() if l.startswith("#")), "")
        print(f"{path.name:28s} {first}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsim", description="Federated learning on a realistic, scriptable network.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a scenario (default: the embedded digits scenario)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", nargs="?", help="scenario TOML file (omit for the embedded default)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key, e.g. network.uplink=1Mbps")
    p.add_argument("--out", metavar="DIR", help="write events.jsonl, metrics.csv, summary.json here")
    p.add_argument("--quiet", action="store_true", help="no per-round progress")
    p.set_defaults(func=cmd_run)
    sv = sub.add_parser("serve", help="run the server side on the wall clock, for clients in other processes/hosts")
    sv.add_argument("scenario", nargs="?")
    sv.add_argument("--set", action="append", metavar="KEY=VALUE")
    sv.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ZeroMQ endpoint (tcp://host:port or ipc:///path)")
    sv.add_argument("--keys", metavar="DIR", help="CURVE key directory from `fedsim keys` (encrypt + authenticate)")
    sv.add_argument("--out", metavar="DIR")
    sv.add_argument("--wait", type=float, default=120.0, help="seconds to wait for all clients to join")
    sv.add_argument("--resume", action="store_true",
                    help="continue a killed server's run from the checkpoint in --out DIR (written after every round)")
    sv.add_argument("--no-emulate", action="store_true",
                    help="no modelled delay, loss or sharing (run.emulate = false): measure the real link")
    sv.set_defaults(func=cmd_serve)
    jn = sub.add_parser("join", help="host client actors that connect to a `fedsim serve` process")
    jn.add_argument("scenario", nargs="?")
    jn.add_argument("--set", action="append", metavar="KEY=VALUE")
    jn.add_argument("--connect", default="tcp://127.0.0.1:5555")
    jn.add_argument("--clients", default="all", help='client ids hosted here, e.g. "0-9,12" (default all)')
    jn.add_argument("--keys", metavar="DIR")
    jn.add_argument("--key-name", default="client-0", help="which clients/<name>.key_secret to use")
    jn.add_argument("--wait", type=float, default=60.0,
                    help="seconds to keep trying while no server answers (with backoff), then give up")
    jn.set_defaults(func=cmd_join)
    ky = sub.add_parser("keys", help="create CURVE certificates for serve/join, and a manifest binding keys to client ids")
    ky.add_argument("directory")
    ky.add_argument("scenario", nargs="?", help="scenario whose data.clients are split between the keys (default: embedded)")
    ky.add_argument("--set", action="append", metavar="KEY=VALUE")
    ky.add_argument("--clients", type=int, default=1, help="number of client keys (client nodes)")
    ky.add_argument("--ids", metavar="SPEC", help='ids per key, e.g. "0-9,10-19" (default: an even split of data.clients)')
    ky.set_defaults(func=cmd_keys)
    sw = sub.add_parser("sweep", help="bandwidth-wall study: uplink bandwidth x algorithm -> time to accuracy, bytes, plots")
    sw.add_argument("scenario", nargs="?")
    sw.add_argument("--bandwidths", default="100kbps,1Mbps,10Mbps,100Mbps", help="comma-separated uplink bandwidths")
    sw.add_argument("--algorithms", default="sgd,qrr,powersgd,lqsgd", help="comma-separated algorithm names")
    sw.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key for every run")
    sw.add_argument("--out", default="runs/sweep", metavar="DIR", help="where sweep.csv and bandwidth_wall.png go")
    sw.set_defaults(func=cmd_sweep)
    s = sub.add_parser("scenarios", help="list the scenario files shipped in scenarios/")
    s.set_defaults(func=cmd_scenarios)
    args = parser.parse_args(argv)
    return guarded(args.func, args)


def guarded(func, args: argparse.Namespace) -> int:
    """Run a subcommand; a user's mistake or a deployment failure is one line and an exit
    code (2: usage, 1: at run time, 130: interrupted), never a traceback."""
    from network.errors import NetworkConfigError

    from .checkpoint import CheckpointError
    from .errors import DeployError
    try:
        return func(args)
    except DeployError as exc:
        _say(f"error: {exc}")
        return exc.exit_code
    except (ScenarioError, NetworkConfigError) as exc:
        _say(f"error: {exc}")
        return 2
    except DataError as exc:
        _say(f"error: {exc}")
        return 2
    except CheckpointError as exc:
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
