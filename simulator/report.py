"""The experiment report: Markdown, PNG plots and CSV files in one folder.

    report.md             setup, the results table, plots, per-device and per-variant details
    results.csv           the results table, one row per variant
    curves.csv            every evaluation: variant, time, version, mean / worst losses, per domain
    events.csv            every event of every run (see simulator.events)
    loss_vs_time.png      mean and worst-device eval loss vs virtual time, one line per variant
    accuracy_vs_time.png  task accuracy vs virtual time (only when an accuracy hook ran)
    staleness.png         histogram of τ at aggregation, one panel per variant
    contributions.png     each device's share of the aggregation weight, one panel per variant

Plots need matplotlib (Agg backend, no display); without it the report says so and the Markdown
and CSV files are still written.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator.config import SimulationConfig
from simulator.events import write_csv
from simulator.experiment import ExperimentResult
from simulator.fleet import speed_span
from simulator.metrics import RunResult, contributions
from simulator.testbed import Testbed

REPORT = "report.md"
RESULTS_CSV = "results.csv"
CURVES_CSV = "curves.csv"
EVENTS_CSV = "events.csv"
LOSS_PNG = "loss_vs_time.png"
ACCURACY_PNG = "accuracy_vs_time.png"
STALENESS_PNG = "staleness.png"
CONTRIBUTIONS_PNG = "contributions.png"


@dataclass(frozen=True, slots=True)
class ReportFiles:
    folder: Path
    markdown: Path
    files: tuple[Path, ...]  # everything written, the Markdown included
    plots_skipped: str = ""  # why no PNGs were written, if none were


def write_report(result: ExperimentResult, testbed: Testbed, simulation: SimulationConfig, out: Path) -> ReportFiles:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _write(out / RESULTS_CSV, results_csv(result)),
        _write(out / CURVES_CSV, curves_csv(result.runs, [d.name for d in testbed.domains])),
        write_csv(out / EVENTS_CSV, [(r.variant, r.events) for r in result.runs]),
    ]
    plots: list[Path] = []
    skipped = ""
    try:
        plots = write_plots(result, testbed, out)
    except ImportError as exc:
        skipped = f"plots skipped: {exc.name or 'matplotlib'} is not installed (pip install matplotlib)"
    md = _write(out / REPORT, markdown(result, testbed, simulation, plots, skipped))
    return ReportFiles(folder=out, markdown=md, files=(md, *written, *plots), plots_skipped=skipped)


# -- tables ---------------------------------------------------------------------------------------


def results_csv(result: ExperimentResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "variant",
            "time_to_target_s",
            "final_eval_loss",
            "late_mean_loss",
            "worst_device_loss",
            "accuracy",
            "jain_index",
            "bytes_up",
            "bytes_down",
            "coordinator_cpu_s",
            "versions",
            "accepted",
            "rejected",
            "mean_staleness",
            "alignment_residual",
        ]
    )
    for s in result.summaries:
        w.writerow(
            [
                s.variant,
                _cell(s.time_to_target_s),
                _cell(s.final_loss),
                _cell(s.late_loss),
                _cell(s.worst_device_loss),
                _cell(s.accuracy),
                _cell(s.jain),
                s.bytes_up,
                s.bytes_down,
                _cell(s.cpu_s),
                s.versions,
                s.accepted,
                s.rejected,
                _cell(s.mean_staleness),
                _cell(s.alignment_residual),
            ]
        )
    return buf.getvalue()


def curves_csv(runs: Sequence[RunResult], domains: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "time", "version", "mean", "worst_domain", "worst_device", *(f"loss_{d}" for d in domains)])
    for r in runs:
        for p in r.curve:
            w.writerow(
                [
                    r.variant,
                    f"{p.time:.6f}",
                    p.version,
                    _cell(p.mean),
                    _cell(p.worst_domain),
                    _cell(p.worst_device),
                    *(_cell(p.per_domain[d]) for d in domains),
                ]
            )
    return buf.getvalue()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(
    result: ExperimentResult,
    testbed: Testbed,
    simulation: SimulationConfig,
    plots: Sequence[Path],
    skipped: str = "",
) -> str:
    m = testbed.manifest
    a = m.architecture
    cfg = testbed.config
    part = cfg.partition
    t = simulation.timing
    plot_names = {p.name for p in plots}
    out: list[str] = ["# AlignFed simulation report", ""]
    out += [
        "## Setup",
        "",
        f"- model: `{m.base_id}` ({a.family}, {a.n_layers} layers, hidden {a.hidden}), LoRA on "
        f"{','.join(m.lora.targets)} with r = {m.lora.rank}, alpha = {m.lora.alpha:g}; "
        f"training base {m.train_quantization}",
        f"- fleet: {len(testbed.devices)} devices in {len({d.profile.name for d in testbed.devices})} classes, "
        f"training speeds span {speed_span(testbed.devices):.1f}×",
        f"- data: {', '.join(f'{d.name} ({len(d.train)} train / {len(d.eval)} held out)' for d in testbed.domains)}; "
        f"partition {part.kind}" + (f" (α = {part.alpha:g})" if part.kind == "dirichlet" else ""),
        f"- virtual time: horizon {simulation.horizon_s:g} s"
        + (f", at most {simulation.max_versions} versions" if simulation.max_versions else "")
        + (f", at most {simulation.wall_limit_s:g} wall s per run" if simulation.wall_limit_s else "")
        + f"; one step = {t.base_step_s:g} s × (batch·seq_len / {t.reference_tokens}) / step_speed"
        + ("; duty cycle honoured" if t.duty_cycle else ""),
        f"- wire: {simulation.wire_quantization} update factors"
        + (f" of rank {simulation.delta_rank}" if simulation.delta_rank else "")
        + (f" (carry rank {simulation.carry_rank})" if simulation.carry_rank else "")
        + ("" if simulation.wire_codec == "none" else f", {simulation.wire_codec}d")
        + ("" if simulation.downlink == "snapshot" else f"; downlink {simulation.downlink} deltas")
        + f"; optimizer moments reset every {simulation.optimizer}; seed {simulation.seed}",
        "",
        "## Results",
        "",
    ]
    rows = [list(s.cells().values()) for s in result.summaries]
    header = list(result.summaries[0].cells()) if result.summaries else []
    out += [markdown_table(header, rows), ""]
    if result.target is not None:
        out += [f"Time-to-target: first virtual time at which the mean held-out eval loss ≤ {result.target:.4f}.", ""]
    out += [
        "Jain's index is over every device's summed aggregation weight; bytes are real encoded message sizes; "
        "coordinator CPU is process time inside the strategy (host-dependent, unlike everything else here).",
        "",
    ]
    if skipped:
        out += [f"_{skipped}_", ""]
    for name, title in (
        (LOSS_PNG, "Eval loss vs virtual time"),
        (ACCURACY_PNG, "Task accuracy vs virtual time"),
        (STALENESS_PNG, "Staleness at aggregation"),
        (CONTRIBUTIONS_PNG, "Contribution per device"),
    ):
        if name in plot_names:
            out += [f"## {title}", "", f"![{title}]({name})", ""]
    out += ["## Devices", ""]
    dev_rows = []
    for d in testbed.devices:
        p = d.profile
        data = testbed.data[d.device_id]
        mix = ", ".join(f"{n} {x:.0%}" for n, x in zip(testbed.domain_names(), data.mix, strict=True) if x > 0)
        dev_rows.append(
            [
                d.device_id,
                p.name,
                f"{p.step_speed:g}",
                f"{t.train_s(p):.2f}",
                f"{p.local_steps}×{p.batch}×{p.seq_len}",
                f"{p.uplink_kbps:g}/{p.downlink_kbps:g}",
                f"{p.latency_ms:g}",
                f"{p.availability:g}",
                str(data.examples),
                mix,
            ]
        )
    out += [
        markdown_table(
            [
                "device",
                "profile",
                "step speed",
                "train s/round",
                "steps×batch×seq",
                "up/down kbps",
                "latency ms",
                "availability",
                "examples",
                "domains",
            ],
            dev_rows,
        ),
        "",
        "## Per variant",
        "",
    ]
    for r in result.runs:
        out += [f"### {r.variant}", ""]
        out += [
            f"- rounds trained {r.rounds}, versions {r.versions}, last event at {r.end_time:.1f} s"
            + (" (stopped there by the wall-clock limit)" if r.wall_limited else ""),
            "- staleness at aggregation: " + _histogram(r.staleness),
            "- updates folded per device: " + ", ".join(f"{d} {r.folded.get(d, 0)}" for d in r.devices),
        ]
        reasons = Counter(e.detail.split(":", 1)[0] for e in r.events if e.kind == "reject")
        if reasons:
            out.append("- rejected: " + ", ".join(f"{k} × {v}" for k, v in sorted(reasons.items())))
        if r.alignment:
            layers = sorted({k for m_ in r.alignment for k in m_})
            means = {
                lid: sum(m_.get(lid, 0.0) for m_ in r.alignment) / sum(1 for m_ in r.alignment if lid in m_)
                for lid in layers
            }
            out.append("- mean alignment residual ρ per layer: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
        if r.accuracy:
            out.append(f"- accuracy of the final adapter (v{r.accuracy[-1].version}): {r.accuracy[-1].accuracy:.3f}")
        out.append("")
    out += [
        "## Files",
        "",
        f"`{RESULTS_CSV}` (the table), `{CURVES_CSV}` (every evaluation), `{EVENTS_CSV}` (every event: "
        "time, kind, device, version, staleness, bytes, loss)" + (", the PNG plots above" if plots else "") + ".",
        "",
    ]
    return "\n".join(out)


# -- plots ----------------------------------------------------------------------------------------


def write_plots(result: ExperimentResult, testbed: Testbed, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = result.runs
    colors = {r.variant: plt.get_cmap("tab10")(i % 10) for i, r in enumerate(runs)}
    styles = {r.variant: "-" if i < 10 else "--" for i, r in enumerate(runs)}
    written: list[Path] = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), sharex=True)
    for r in runs:
        ts = [p.time for p in r.curve]
        style = {"where": "post", "color": colors[r.variant], "ls": styles[r.variant]}
        ax1.step(ts, [p.mean for p in r.curve], label=r.variant, **style)
        ax2.step(ts, [p.worst_device for p in r.curve], **style)
    if result.target is not None:
        ax1.axhline(result.target, color="grey", lw=0.8, ls=":", label=f"target {result.target:.3f}")
    ax1.set(xlabel="virtual time (s)", ylabel="mean held-out eval loss", title="eval loss (mean over domains)")
    ax2.set(xlabel="virtual time (s)", ylabel="eval loss", title="worst-device eval loss")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out / LOSS_PNG, plt))

    if any(r.accuracy for r in runs):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in runs:
            if r.accuracy:
                ax.plot(
                    [p.time for p in r.accuracy],
                    [p.accuracy for p in r.accuracy],
                    marker="o",
                    color=colors[r.variant],
                    label=r.variant,
                )
        ax.set(xlabel="virtual time (s)", ylabel="task accuracy", title="task accuracy", ylim=(0, 1))
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / ACCURACY_PNG, plt))

    fig, axes = _grid(plt, len(runs))
    top = max([max(r.staleness, default=0) for r in runs] + [1])
    for ax, r in zip(axes, runs, strict=False):
        taus = list(range(top + 1))
        ax.bar(taus, [r.staleness.get(t_, 0) for t_ in taus], color=colors[r.variant])
        ax.set_title(r.variant, fontsize=9)
        ax.set_xlabel("τ (versions behind)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(runs) :]:
        ax.set_visible(False)
    fig.suptitle("staleness of aggregated updates")
    fig.tight_layout()
    written.append(_save(fig, out / STALENESS_PNG, plt))

    fig, axes = _grid(plt, len(runs))
    classes = {d.device_id: d.device_class for d in testbed.devices}
    cmap = plt.get_cmap("viridis")
    n_classes = max(classes.values(), default=0) + 1
    for ax, r in zip(axes, runs, strict=False):
        contrib = contributions(r)
        total = sum(contrib.values()) or 1.0
        devs = list(contrib)
        ax.bar(
            range(len(devs)),
            [contrib[d] / total for d in devs],
            color=[cmap(classes[d] / max(n_classes - 1, 1)) for d in devs],
        )
        ax.set_xticks(range(len(devs)), [d.removeprefix("dev-") for d in devs], fontsize=7)
        ax.set_title(r.variant, fontsize=9)
        ax.axhline(1.0 / max(len(devs), 1), color="grey", lw=0.8, ls=":")
    for ax in axes[len(runs) :]:
        ax.set_visible(False)
    fig.suptitle("share of aggregation weight per device (colour: speed class, dark = slow; dotted: equal share)")
    fig.tight_layout()
    written.append(_save(fig, out / CONTRIBUTIONS_PNG, plt))
    return written


def _grid(plt: Any, n: int) -> tuple[Any, list[Any]]:
    cols = min(max(n, 1), 4)
    rows = math.ceil(max(n, 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- helpers --------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _cell(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.6g}"


def _histogram(c: Counter[int]) -> str:
    return ", ".join(f"τ={t}: {n}" for t, n in sorted(c.items())) if c else "(nothing aggregated)"
