"""What `make test-latest` is about to test that the lock does not hold.

    python scripts/newer_releases.py requirements/lock.txt    # run by `make test-latest`

Run with the interpreter of the venv that installed the newest releases: the installed version
of each package is its newest release. Prints each package whose installed version differs from
the lock (name, locked, newest), marks the dependencies of pyproject.toml whose newest release
lies outside its bounds, then what `pip check` says. It only reports: it always exits 0, so a
bound never stops the suite from trying what is newer.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def locked(lock: Path) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9._-]+)==([^\s\\;]+)", lock.read_text(), flags=re.MULTILINE)
    return {canonicalize_name(name): version for name, version in pins}


def bounds() -> dict[str, Requirement]:
    """pyproject.toml's dependencies and the extras the lock resolves (test, bench, harness)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    reqs = [
        Requirement(r) for r in project["dependencies"] + extras["test"] + extras["bench"] + extras["harness"]
    ]
    return {canonicalize_name(r.name): r for r in reqs}


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def rows(pins: dict[str, str], reqs: dict[str, Requirement], have: dict[str, str]) -> list[tuple[str, ...]]:
    out = []
    for name in sorted(set(pins) | set(reqs)):
        if name == "torch" or name not in have:  # torch is TORCH_SPEC's, not the lock's
            continue
        newest, was = have[name], pins.get(name, "-")
        req = reqs.get(name)
        outside = req is not None and not req.specifier.contains(Version(newest), prereleases=True)
        if newest != was or outside:
            note = f"outside pyproject's {req.specifier}" if outside else ""
            if was != "-" and Version(newest) < Version(was):  # the newest of others asked for less
                note = "older than the lock: another package's newest release bounds it"
            out.append((name, was, newest, note))
    return out


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    pins, reqs, have = locked(Path(sys.argv[1])), bounds(), installed()
    found = rows(pins, reqs, have)
    print(f"make test-latest: {len(found)} package(s) differ from {sys.argv[1]}")
    if found:
        width = max(len(r[0]) for r in found)
        print(f"  {'package':<{width}}  {'locked':<12} {'newest':<12}")
        for name, was, newest, note in found:
            print(f"  {name:<{width}}  {was:<12} {newest:<12} {note}".rstrip())
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    complaints = [line for line in check.stdout.splitlines() if line.strip() and "No broken" not in line]
    if complaints:
        print("pip check (reported, not enforced here):")
        print("\n".join(f"  {line}" for line in complaints))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
