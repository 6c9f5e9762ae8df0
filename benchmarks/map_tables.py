"""The sweep table (mean ± sd, paired differences against the first method) of the runs that finished.

A sweep writes its ``sweep.md`` when all its cells have run; a map stopped part-way has folders of
finished runs and no table for them. This reads ``FOLDER/<method>/seed-<n>/results.json`` for the methods
given, keeps each method's finished seeds, and writes ``FOLDER/<stem>.md`` (and its figure) with
`gere.continual.aggregate` exactly as a sweep does::

    .venv/bin/python benchmarks/map_tables.py runs/map/r1 none ce ce+tm ce+tm-gb1 --stem finished
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gere.continual.aggregate import aggregate_runs, write_aggregate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("methods", nargs="+", help="the first is the baseline of the paired differences")
    p.add_argument("--stem", default="finished")
    p.add_argument("--title", default="Finished runs")
    args = p.parse_args(argv)
    groups: dict[str, list[dict]] = {}
    for method in args.methods:
        runs = sorted((args.folder / method).glob("seed-*/results.json"), key=lambda f: int(f.parent.name[5:]))
        if runs:
            groups[method] = [json.loads(f.read_text()) for f in runs]
        print(f"{method}: seeds {[f.parent.name[5:] for f in runs] or 'none finished'}")
    if args.methods[0] not in groups:
        print(f"{args.methods[0]} (the baseline) has no finished run in {args.folder}")
        return 2
    paths = write_aggregate(aggregate_runs(groups, baseline=args.methods[0]), args.folder, args.title, args.stem)
    print("\n".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
