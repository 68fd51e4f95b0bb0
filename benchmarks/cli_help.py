"""How long `hf-weightprune --help` takes, against the floor `python -c "import argparse"`, in one run.

Both commands start a fresh interpreter, so the ratio is what the CLI adds on top of Python's own start-up (it was
4.5-10 s when `--help` imported torch through the package `__init__`). Both are warmed the same way (two untimed
runs each, so the file cache holds both), then run alternately, `--repeats` times each; the table gives median
and min-max wall time in seconds.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/cli_help.py --repeats 15
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time


def _cli() -> list[str]:
    """The installed `hf-weightprune` script next to this interpreter, else the module (the same `main`)."""
    script = shutil.which("hf-weightprune", path=os.path.dirname(sys.executable))
    return [script, "--help"] if script else [sys.executable, "-m", "hf_weightprune.tools.cli", "--help"]


def _time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15, help="timed runs of each command (default: 15)")
    args = p.parse_args()
    if args.repeats < 10:
        raise SystemExit("--repeats must be at least 10")
    commands = {"hf-weightprune --help": _cli(), 'python -c "import argparse"': [sys.executable, "-c",
                                                                                  "import argparse"]}
    for cmd in commands.values():
        for _ in range(2):
            _time(cmd)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):  # alternating: both see the same machine load
        for name, cmd in commands.items():
            times[name].append(_time(cmd))
    print(f"{args.repeats} runs each, wall seconds ({' '.join(commands['hf-weightprune --help'])})")
    print("| command | median (s) | min-max (s) |\n| --- | --- | --- |")
    for name, ts in times.items():
        print(f"| `{name}` | {statistics.median(ts):.3f} | {min(ts):.3f}-{max(ts):.3f} |")
    cli, floor = (statistics.median(t) for t in times.values())
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    print(f"ratio (median / median): {cli / floor:.2f}x; {probe.stdout.strip().splitlines()[-1]}")


# Whether `--help` imports torch, in a fresh interpreter (the last line it prints).
_PROBE = ("import sys\nfrom hf_weightprune.tools.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
          "print('torch imported by --help:', 'torch' in sys.modules)")


if __name__ == "__main__":
    main()
