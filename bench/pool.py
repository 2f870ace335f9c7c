#!/usr/bin/env python
"""Pool the per-iteration timings of several ``bench/step.py --raw`` runs into one paired summary.

One run on a noisy shared machine gives a wide confidence interval for a 1 % effect; runs of the
same code can be pooled because every ratio is paired within an iteration.

    python bench/step.py --steps 30 --raw | tee run1.txt   # ... as many runs as wanted
    python bench/pool.py run1.txt run2.txt run3.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import paired_summary, print_paired  # noqa: E402


def read_raw(path: str) -> dict[str, list[float]]:
    for line in Path(path).read_text().splitlines():
        if line.startswith('{"raw_ms"'):
            return json.loads(line)["raw_ms"]
    raise SystemExit(f"error: {path}: no raw_ms line (run bench/step.py with --raw)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="+", help="Saved outputs of bench/step.py --raw.")
    options = parser.parse_args(argv)
    pooled: dict[str, list[float]] = {}
    for path in options.outputs:
        for name, values in read_raw(path).items():
            pooled.setdefault(name, []).extend(values)
    summary = paired_summary(pooled)
    print_paired(summary)
    print(json.dumps({"runs": len(options.outputs), "paired": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
