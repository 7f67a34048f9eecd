"""Whether two attack reports say the same, timings and dates aside.

    python benchmarks/compare_reports.py before/attack/report.json after/attack/report.json

Used to show that a refactor left the demo's results unchanged: every figure, interval, note
and count must be equal; `created` and `seconds_per_sample` (timings) are left out, and paths
of the two experiment folders are compared with their folder replaced by `<experiment>`.
Prints each difference and ends with `RESULT reports_identical 1` (or 0, exit status 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

IGNORED = {"created", "seconds_per_sample"}


def normalized(value: Any, root: str) -> Any:
    """`value` without timings and dates, its experiment folder spelt `<experiment>`."""
    if isinstance(value, dict):
        return {k: normalized(v, root) for k, v in value.items() if k not in IGNORED}
    if isinstance(value, list):
        return [normalized(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<experiment>")
    return value


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Every path where `a` and `b` differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{where}/{key}: only in {'after' if key in b else 'before'}")
            else:
                out += differences(a[key], b[key], f"{where}/{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="report.json of the first run")
    parser.add_argument("after", type=Path, help="report.json of the second run")
    args = parser.parse_args()
    docs = []
    for path in (args.before, args.after):
        root = str(path.resolve().parent.parent)  # <experiment>/attack/report.json
        docs.append(normalized(json.loads(path.read_text(encoding="utf-8")), root))
    found = differences(*docs)
    for line in found:
        print(line)
    print(f"{len(found)} differences; attacks compared: {sorted(docs[0].get('attacks', {}))}")
    print(f"RESULT reports_identical {int(not found)}")
    return 0 if not found else 1


if __name__ == "__main__":
    sys.exit(main())
