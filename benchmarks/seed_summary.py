"""Mean ± standard deviation over seeds of `alignfed simulate` reports, as docs/results.md prints them.

    python benchmarks/seed_summary.py REPORT_DIR [REPORT_DIR ...]

Each REPORT_DIR is one seed's `--out` folder (results.csv, curves.csv). Prints the per-variant table
(time to FedAvg's final loss, final / late-mean / worst-device eval loss, Jain's index, versions,
alignment residual) and, for the three re-factorizations, the mean eval loss at fixed versions and
the first version at or below FedAvg's final loss in each seed.
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

VERSIONS = (10, 25, 50, 100, 200, 300)
REFACTORIZATIONS = ("alignfed", "alignfed-qrcp", "alignfed-cur")


def spread(values: list[str], fmt: str = "{:.3f}") -> str:
    xs = [float(v) for v in values if v not in ("", "—")]
    if not xs:
        return "—"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs))}"


def main(runs: list[Path]) -> None:
    results: dict[str, list[dict[str, str]]] = {}
    curves: dict[tuple[Path, str], dict[int, float]] = {}
    targets: dict[Path, float] = {}
    for run in runs:
        for row in csv.DictReader((run / "results.csv").open()):
            results.setdefault(row["variant"], []).append(row)
            if row["variant"] == "fedavg":
                targets[run] = float(row["final_eval_loss"])
        for row in csv.DictReader((run / "curves.csv").open()):
            curves.setdefault((run, row["variant"]), {})[int(row["version"])] = float(row["mean"])
    print("| variant | time to FedAvg's final loss (s) | final eval loss | late mean loss | worst-device loss "
          "| Jain | versions | ρ |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for variant, rows in results.items():
        cells = [
            spread([r["time_to_target_s"] for r in rows], "{:.0f}"),
            *(spread([r[k] for r in rows]) for k in ("final_eval_loss", "late_mean_loss", "worst_device_loss")),
            spread([r["jain_index"] for r in rows]),
            spread([r["versions"] for r in rows], "{:.0f}"),
            spread([r["alignment_residual"] for r in rows]),
        ]
        print(f"| {variant} | " + " | ".join(cells) + " |")
    print()
    print("| variant | " + " | ".join(f"v{v}" for v in VERSIONS) + " | first version at FedAvg's final loss |")
    print("|---|" + "---|" * (len(VERSIONS) + 1))
    for variant in REFACTORIZATIONS:
        if (runs[0], variant) not in curves:
            continue
        at = [spread([str(curves[(r, variant)][v]) for r in runs if v in curves[(r, variant)]]) for v in VERSIONS]
        first = [
            next((str(v) for v, loss in sorted(curves[(r, variant)].items()) if loss <= targets[r]), "—")
            for r in runs
            if r in targets
        ]
        print(f"| {variant} | " + " | ".join(at) + f" | {', '.join(first)} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main([Path(p) for p in sys.argv[1:]])
