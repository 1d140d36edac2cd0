"""Print a pip/uv constraints file that pins every runtime requirement to its floor.

``.ci/run`` installs the package with these constraints and runs the suite, so the
lower bounds in setup.cfg are tested, not claimed. Runtime requirements are
``install_requires`` and the ``sqlalchemy`` and ``redis`` extras (what an app
installs); test tools stay at their newest releases. Every runtime requirement
must have a ``>=`` floor: one without is an error here, since its lowest version
would be whatever the resolver finds.

Usage: ``python .ci/lowest_constraints.py [setup.cfg] > lowest.txt``
"""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

RUNTIME_EXTRAS = ("sqlalchemy", "redis")
_FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*$")


def requirements(setup_cfg: Path) -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(setup_cfg, encoding="utf-8")
    lines = parser.get("options", "install_requires").splitlines()
    for extra in RUNTIME_EXTRAS:
        lines += parser.get("options.extras_require", extra).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def constraints(setup_cfg: Path) -> list[str]:
    pins: dict[str, str] = {}
    for requirement in requirements(setup_cfg):
        match = _FLOOR.match(requirement)
        if match is None:
            raise SystemExit(f"{setup_cfg}: runtime requirement {requirement!r} has no '>=' floor")
        name, floor = match.groups()
        pins.setdefault(name, floor)
    return [f"{name}=={floor}" for name, floor in pins.items()]


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "setup.cfg"
    print("\n".join(constraints(path)))
