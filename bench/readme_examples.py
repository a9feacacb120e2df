"""Run the README's examples as written and compare the accuracies it states.

Every `fedsim run` command in a ```sh block whose trailing comment says "final accuracy X"
runs in-process (fedsim.cli.main, the same code as the installed `fedsim` script), and
every Python block runs with each `print(...)  # prints X` line checked against X (to the
4 decimals the README gives). Commands run from a scratch directory holding a copy of
scenarios/, so `runs/...` outputs do not land in the repository.

    python bench/readme_examples.py [--only SUBSTRING]
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedsim.cli import main  # noqa: E402

STATED = re.compile(r"final accuracy (\d\.\d+)")


def blocks(text: str, lang: str) -> list[tuple[int, str]]:
    """(first line number, body) of every fenced block of ``lang``."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            out.append((i + 2, "\n".join(lines[i + 1:j])))
            i = j
        i += 1
    return out


def commands(body: str) -> list[str]:
    """Shell commands of a block, backslash continuations joined."""
    out, cur = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    return out


def fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def main_bench() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only examples whose text contains this")
    args = ap.parse_args()
    text = (ROOT / "README.md").read_text()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "scenarios", Path(tmp) / "scenarios")
        os.chdir(tmp)
        for _, body in blocks(text, "sh"):
            for cmd in commands(body):
                m = STATED.search(cmd)
                if not m or "fedsim run" not in cmd or args.only not in cmd:
                    continue
                argv = shlex.split(cmd.split("#", 1)[0])[1:]
                if "--out" not in argv:
                    argv += ["--out", "runs/_example"]
                out = Path(argv[argv.index("--out") + 1])
                t = time.perf_counter()
                rc = main([*argv, "--quiet"])
                got = json.loads((out / "summary.json").read_text())["final_accuracy"] if rc == 0 else None
                results.append((cmd.split("#", 1)[0].strip(), m.group(1), fmt(got), time.perf_counter() - t))
        for line0, body in blocks(text, "python"):
            if args.only not in body:
                continue
            printed: dict[int, list] = {}
            real_print = builtins.print

            def spy(*values, **kw):
                frame = sys._getframe(1)
                if frame.f_code.co_filename == "<README>":
                    printed.setdefault(frame.f_lineno, []).append(values)
                real_print(*values, **kw)

            t = time.perf_counter()
            builtins.print = spy
            try:
                exec(compile(body, "<README>", "exec"), {"__name__": "__readme__"})
            finally:
                builtins.print = real_print
            for n, line in enumerate(body.splitlines(), 1):
                m = re.search(r"# prints (\d\.\d+)", line)
                if m:
                    got = printed.get(n, [[None]])[0][0]
                    results.append((f"README line {line0 + n - 1}: {line.split('#')[0].strip()}", m.group(1),
                                    fmt(got), time.perf_counter() - t))
    ok = True
    print(f"\n{'example':100s} {'README':>7s} {'got':>7s} {'wall s':>7s}")
    for cmd, stated, got, wall in results:
        ok &= stated == got
        print(f"{cmd[:100]:100s} {stated:>7s} {got:>7s} {wall:7.1f}{'' if stated == got else '  MISMATCH'}")
    print("all match" if ok else "MISMATCHES above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main_bench())
