"""``fedsim`` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import DataError, ScenarioError

EPILOG = """examples:
  fedsim run                                   # the embedded default: digits, 20 clients, fedavg
  fedsim run scenarios/lossy_uplink.toml --out runs/lossy
  fedsim run scenarios/default.toml --set algorithm.name=qrr --set run.rounds=300 --set algorithm.lr=0.5
  fedsim check scenarios/default.toml --set algorithm.name=qrr   # validate, print resolved TOML
  fedsim algorithms qrr                        # a method's keys, defaults and docs
  fedsim plot runs/a runs/b --out fig.png
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


def _console(stderr: bool = True):
    """A rich console that never wraps a message into a pipe's 80 columns (tables still fit
    the terminal when there is one)."""
    from rich.console import Console
    return Console(stderr=stderr, soft_wrap=True)


def _say(console, label: str, message: object, style: str = "red") -> None:
    """One line, ``label: message``; the message is printed literally (a value like
    ``[64]`` is not rich markup)."""
    from rich.text import Text
    console.print(Text.assemble((f"{label}:", style), " ", str(message)), soft_wrap=True)


def _notes(console, notes) -> None:
    for n in notes:
        _say(console, "note", n, "yellow")


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from . import api

    console = _console()
    try:
        scenario = api.load(args.scenario, args.set or [])
    except ScenarioError as exc:
        _say(console, "scenario error", exc)
        return 2
    _notes(console, scenario.notes)
    live = sys.stderr.isatty() and not args.quiet

    def line(m, total):
        acc = "-" if m.accuracy is None else f"{m.accuracy:.4f}"
        print(f"round {m.round + 1}/{total}  acc {acc}  sim {m.sim_time_s:.2f}s  "
              f"up {_fmt_bytes(m.uplink_bytes)}  down {_fmt_bytes(m.downlink_bytes)}", file=sys.stderr, flush=True)

    def go(progress):
        return api.run(args.scenario, args.set or [], out=args.out, progress=progress, tensorboard=args.tensorboard)

    try:
        if live:
            with Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
                          TextColumn("acc {task.fields[acc]}  sim {task.fields[sim]}  up {task.fields[up]}  down {task.fields[down]}"),
                          TimeElapsedColumn(), console=Console(stderr=True)) as bar:
                task = bar.add_task("run", total=scenario.run.rounds, acc="-", sim="0s", up="0 B", down="0 B")

                def update(m, total):
                    bar.update(task, completed=m.round + 1,
                               acc="-" if m.accuracy is None else f"{m.accuracy:.4f}",
                               sim=f"{m.sim_time_s:.1f}s", up=_fmt_bytes(m.uplink_bytes), down=_fmt_bytes(m.downlink_bytes))
                result = go(update)
        else:
            result = go(None if args.quiet else line)
    except (DataError, ScenarioError) as exc:
        _say(console, "error", exc)
        return 2
    s = result.summary
    table = Table(title=f"{s['algorithm']} · {s['dataset']} · {s['clients']} clients · seed {s['seed']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    acc = s["final_accuracy"]
    drops = ", ".join(f"{k} {v}" for k, v in s.get("drops", {}).items() if v) or "none"
    deadline = s.get("round_deadline_s")
    rows = [
        ("final accuracy", "-" if acc is None else f"{acc:.4f}"),
        ("rounds", str(s["rounds"])),
        ("simulated time", f"{s['sim_time_s']:.2f} s"),
        ("wall time", f"{s['wall_time_s']:.2f} s"),
        (f"time to {s['target_accuracy']}", "not reached" if s["time_to_target_s"] is None else f"{s['time_to_target_s']:.2f} s"),
        ("uplink", _fmt_bytes(s["uplink_bytes"])),
        ("downlink", _fmt_bytes(s["downlink_bytes"])),
        ("payload bits (up+down)", f"{s['payload_bits']:,}"),
        ("replies received / missed", f"{s['replies']['received']} / {s['replies']['missed']}"),
        ("network drops", drops),
        ("round deadline", "none" if deadline is None else
         f"{deadline:.3g} s" + (" (derived)" if s.get("round_deadline_derived") else "")),
        ("model sha256", s["model_sha256"][:16] + "…"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    for k, v in s["counters"].items():
        table.add_row(f"count: {k}", str(v))
    Console().print(table)
    if args.out:
        console.print(f"results in {Path(args.out)}/ (summary.json, metrics.csv, events.jsonl)", soft_wrap=True)
    if args.tensorboard:
        console.print(f"tensorboard scalars in {args.tensorboard}/ (tensorboard --logdir {args.tensorboard})",
                      soft_wrap=True)
    if s.get("interrupted"):
        console.print(f"interrupted after {s['rounds']} rounds: the results above are partial", soft_wrap=True)
        return 130
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from . import api
    console = _console()
    try:
        scenario = api.load(args.scenario, args.set or [])
        text = api.check(args.scenario, args.set or [])
    except ScenarioError as exc:
        _say(console, "scenario error", exc)
        return 2
    except DataError as exc:
        _say(console, "data error", exc)
        return 2
    _notes(console, scenario.notes)
    if args.out:
        Path(args.out).write_text(text)
        console.print(f"ok: {scenario.source} is valid; resolved scenario in {args.out}", soft_wrap=True)
    else:
        sys.stdout.write(text)
    return 0


def cmd_algorithms(args: argparse.Namespace) -> int:
    from . import api
    methods = api.algorithms()
    if args.name:
        methods = [m for m in methods if m["name"] in args.name]
        unknown = sorted(set(args.name) - {m["name"] for m in methods})
        if unknown:
            _say(_console(), "error", f"unknown algorithm {', '.join(unknown)} (known: "
                 f"{', '.join(m['name'] for m in api.algorithms())})")
            return 2
    for m in methods:
        print(f"{m['name']}{' (stateful)' if m['stateful'] else ''}: {m['doc']}")
        for k in m["keys"]:
            default = k["default"]
            shown = "unset" if default is None else repr(default) if isinstance(default, str) else str(default).lower() \
                if isinstance(default, bool) else str(default)
            doc = k["doc"]
            if not args.full and doc:
                doc = doc.split(". ")[0].rstrip(".") + "."
            print(f"  {k['name']:22s} {k['type']:12s} = {shown:14s} {doc}")
        print()
    print("Set a key for one method with [algorithm.NAME] tables (or --set algorithm.NAME.KEY=VALUE); "
          "keys directly under [algorithm] apply to whichever method runs.")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from . import api
    console = _console()
    try:
        out = api.plot(args.runs, args.out, bits=args.bits)
    except ScenarioError as exc:
        _say(console, "error", exc)
        return 2
    console.print(f"wrote {out}", soft_wrap=True)
    return 0


def _load(args, console):
    from .scenario import load_scenario
    try:
        return load_scenario(args.scenario, args.set or [])
    except ScenarioError as exc:
        console.print(f"[red]scenario error:[/red] {exc}")
        return None


def _status(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .deploy import serve
    console = Console(stderr=True, soft_wrap=True)
    scenario = _load(args, console)
    if scenario is None:
        return 2
    if scenario.run.clock != "real":
        _status("note: serve runs on the wall clock (run.clock = real)")
        scenario.run.clock = "real"
    if args.no_emulate:
        scenario.run.emulate = False
    if args.wait <= 0:
        _status(f"error: --wait {args.wait:g}: must be > 0 seconds")
        return 2

    def line(m, total):
        acc = "-" if m.accuracy is None else f"{m.accuracy:.4f}"
        print(f"round {m.round + 1}/{total}  acc {acc}  time {m.sim_time_s:.2f}s  up {_fmt_bytes(m.uplink_bytes)}",
              file=sys.stderr, flush=True)

    result = serve(scenario, args.bind, keys=args.keys, out_dir=args.out, progress=line, resume=args.resume,
                   ready=lambda addr: _status(f"listening on {addr}; waiting for {scenario.data.clients} clients"
                                           f"{'' if scenario.run.emulate else ' (network model off: the link is real)'}"),
                   registration_timeout=args.wait, say=_status)
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
        _status(f"error: --wait {args.wait:g}: must be > 0 seconds")
        return 2
    result = join(scenario, args.connect, ids, keys=args.keys, key_name=args.key_name, wait=args.wait, say=_status)
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
    import time

    from rich.console import Console
    from rich.table import Table

    from network.errors import NetworkConfigError

    from . import api
    from .study import parse_seeds
    console = _console()
    bandwidths = [b.strip() for b in args.bandwidths.split(",") if b.strip()]
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]

    def progress(cell, i, n):
        s = cell.summary
        ttt = "not reached" if s["time_to_target_s"] is None else f"{s['time_to_target_s']:.1f}s"
        acc = "-" if s["final_accuracy"] is None else f"{s['final_accuracy']:.4f}"
        print(f"[{i}/{n}] {cell.algorithm:9s} uplink {cell.uplink:>8s} seed {s['seed']}: acc {acc}, "
              f"time to target {ttt}, up {_fmt_bytes(s['uplink_bytes'])}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    try:
        seeds = parse_seeds(args.seeds) if args.seeds else None
        study = api.sweep(args.scenario, algorithms=algorithms, bandwidths=bandwidths, seeds=seeds,
                          overrides=args.set or [], out=args.out, jobs=args.jobs, engine=args.engine,
                          address=args.address, on_cell=progress)
    except (ScenarioError, NetworkConfigError, DataError) as exc:
        _say(console, "error", exc)
        return 2
    table = Table(title="bandwidth wall: simulated time to target accuracy (s)"
                  + (" — mean ± sd over seeds" if seeds and len(seeds) > 1 else ""))
    table.add_column("algorithm")
    for bw in bandwidths:
        table.add_column(bw, justify="right")
    for a in algorithms:
        row = [r for r in study.rows if r["algorithm"] == a]

        def cell(r):
            if r["time_to_target_s"] is None:
                return "-"
            text = f"{r['time_to_target_s']:.1f}"
            if seeds and len(seeds) > 1:
                text += f" ± {r['time_to_target_s_sd']:.1f} ({r['reached']}/{len(seeds)})"
            return text
        table.add_row(a, *[cell(r) for r in row])
    Console().print(table)
    console.print(f"{len(study.runs)} runs in {time.perf_counter() - started:.1f} s wall "
                  f"({args.engine}, {args.jobs} job{'s' if args.jobs > 1 else ''})", soft_wrap=True)
    console.print("wrote " + ", ".join(str(p) for p in study.files), soft_wrap=True)
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
    p.add_argument("--tensorboard", metavar="DIR",
                   help="write per-round scalars for TensorBoard here (needs: pip install 'fedsim[tensorboard]')")
    p.set_defaults(func=cmd_run)
    ck = sub.add_parser("check", help="validate a scenario without running it; print it resolved, as TOML",
                        description="Validate a scenario (and its --set overrides) without running it, and print "
                                    "every value it runs with, defaults included, as TOML. `fedsim run` on that "
                                    "TOML runs the same thing.")
    ck.add_argument("scenario", nargs="?", help="scenario TOML file (omit for the embedded default)")
    ck.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key")
    ck.add_argument("--out", metavar="FILE", help="write the resolved TOML here instead of stdout")
    ck.set_defaults(func=cmd_check)
    al = sub.add_parser("algorithms", help="list every method with its keys, defaults and docs (from the code)")
    al.add_argument("name", nargs="*", help="only these methods")
    al.add_argument("--full", action="store_true", help="each key's whole docstring (default: its first sentence)")
    al.set_defaults(func=cmd_algorithms)
    pl = sub.add_parser("plot", help="accuracy vs rounds, simulated time and uplink bits for run directories")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories written by `fedsim run --out`")
    pl.add_argument("--out", required=True, metavar="FIG.png", help="image file to write")
    pl.add_argument("--bits", choices=("payload", "wire"), default="payload",
                    help="uplink bits axis: each method's payload count (default) or wire bits")
    pl.set_defaults(func=cmd_plot)
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
    sw.add_argument("--seeds", metavar="SEEDS", help="repeat every cell for these seeds, e.g. 1-5 or 1,3,7: "
                    "sweep.csv gets means and standard deviations, the plot error bars")
    sw.add_argument("--jobs", type=int, default=1, metavar="N", help="run N cells at a time in parallel processes")
    sw.add_argument("--engine", choices=("local", "dask"), default="local",
                    help="local processes (default) or a Dask distributed cluster (pip install 'fedsim[dask]')")
    sw.add_argument("--address", metavar="HOST:PORT",
                    help="with --engine dask: the scheduler of a running cluster (default: a local cluster of "
                         "--jobs worker processes)")
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
        _status(f"error: {exc}")
        return exc.exit_code
    except (ScenarioError, NetworkConfigError) as exc:
        _status(f"error: {exc}")
        return 2
    except DataError as exc:
        _status(f"error: {exc}")
        return 2
    except CheckpointError as exc:
        _status(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _status("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
