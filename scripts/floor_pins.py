"""Print the lowest versions `pyproject.toml` declares, one `name==version` a line (a pip requirements file).

The floor CI job (`scripts/test_floor.sh`) installs exactly these, so its versions follow the declared lower
bounds and cannot drift from them. Every requirement of `[project].dependencies` and of the named extras must
carry a `>=` (or `==`) bound; one without is an error, since "the lowest version" would then mean whatever pip
finds first.

    python scripts/floor_pins.py                       # dependencies + extras peft, plot, dev (minus --skip)
    python scripts/floor_pins.py --extras peft --skip torch

Not pinned by default: `torch` (the floor job reuses the local CPU wheel: an old torch is a multi-GB download and
CUDA build; record the torch it ran with instead), `deepspeed` (builds from source against torch, used only by
`multiproc` tests, which the floor job does not run) and `ruff` (a linter, not imported by the tests).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SKIP = ("torch", "deepspeed", "ruff")
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")


def _load(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        sys.exit(f"{path}: reading it needs Python >= 3.11 (tomllib); run this script with a newer python")
    with open(path, "rb") as f:
        return tomllib.load(f)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version))


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floor_pins(pyproject: Path, extras: list[str], skip: list[str]) -> list[str]:
    """The `name==lowest` lines for `[project].dependencies` plus `extras`, without `skip`; sorted, no repeats.

    Raises:
        SystemExit: an extra that the file does not define, or a requirement without a lower bound or with an
            environment marker (the floor would depend on the machine).
    """
    project = _load(pyproject)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        sys.exit(f"--extras {','.join(unknown)}: not in {pyproject}'s optional-dependencies ({', '.join(optional)})")
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += optional[extra]
    skipped = {_norm(s) for s in skip}
    pins: dict[str, str] = {}
    for req in reqs:
        m = _REQ.match(req)
        if m is None or m.group(4):
            sys.exit(f"{pyproject}: requirement {req!r} is not `name>=version` without a marker; give it a plain bound")
        name = _norm(m.group(1))
        if name in skipped:
            continue
        lows = [s.strip()[2:].strip() for s in m.group(3).split(",") if s.strip()[:2] in (">=", "==")]
        if not lows:
            sys.exit(f"{pyproject}: requirement {req!r} has no lower bound; add `>=` with the oldest version tested")
        # the same package in two places (e.g. peft in `peft` and `dev`): the higher floor wins
        pins[name] = max(lows + ([pins[name]] if name in pins else []), key=_release)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    p.add_argument("--extras", default="peft,plot,dev", help="comma-separated extras to include (default: %(default)s)")
    p.add_argument("--skip", default=",".join(DEFAULT_SKIP), help="packages not to pin (default: %(default)s)")
    a = p.parse_args()
    extras = [e for e in a.extras.split(",") if e]
    print("\n".join(floor_pins(a.pyproject, extras, [s for s in a.skip.split(",") if s])))


if __name__ == "__main__":
    main()
