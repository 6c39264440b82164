"""`alignfed simulate`: virtual-clock experiments comparing strategies on one fleet.

`add_simulate_parser(subparsers)` registers the subcommand (its handler is `simulate_main`, set as
`fn`, the convention of `alignfed.cli`); `simulate_main(args)` runs the experiment and writes the
report. Errors are `alignfed.errors` exceptions; the top-level CLI turns them into exit codes.
Importing this module is cheap (no numpy, ONNX Runtime or matplotlib until a simulation runs), so
building the `alignfed` parser stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignfed.protocol import CODECS, DOWNLINK_QUANTIZATIONS, QUANTIZATIONS
from coordinator.ingest import IngestLimits
from simulator.timing import DEFAULT_STEP_S
from simulator.variants import VARIANT_NAMES, select_variants

if TYPE_CHECKING:
    from collections.abc import Callable

    from dashboard.live import LiveDashboard
    from simulator.accuracy import AccuracyHook
    from simulator.experiment import ExperimentConfig
    from simulator.live import VariantFeed
    from simulator.testbed import TestbedConfig

PARTITIONS = ("domain", "dirichlet", "iid")  # simulator.partition.KINDS (checked by a test)

EPILOG = f"""\
variants: all, or a comma-separated list of {", ".join(VARIANT_NAMES)}.

examples:
  alignfed simulate --bundle bundle/ --devices 8 --classes 4 --horizon 3600 --out report/
  alignfed simulate --bundle bundle/ --data gsm8k=gsm8k/train.jsonl --data code=code_alpaca_2k.json \\
      --partition dirichlet --alpha 0.3 --strategies fedbuff,alignfed,alignfed-no-alignment \\
      --set alignfed.tau_max=16 --max-versions 200 --out report/

Time is virtual: training is real (ONNX Runtime), but each round is charged
local_steps x step-seconds x (batch*seq_len/256) / step_speed from the device profile, and each
message its encoded size over the profile's link, so results depend on the seed, not the host.
"""


def add_simulate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `simulate` on an `argparse` subparsers object; returns its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="compare aggregation strategies on a simulated fleet (virtual clock, real training)",
        description="Run every selected strategy over the same simulated devices, data and seed on a "
        "virtual clock, then write a Markdown report with plots and CSV files.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--bundle", required=True, help="bundle folder written by `alignfed export`")
    g.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a domain's data (.jsonl/.json/text with text, instruction/input/output or question/answer "
        "records); repeat for several domains; default: the built-in arithmetic, code and prose corpora",
    )
    g.add_argument(
        "--partition", choices=PARTITIONS, default="domain", help="how examples are split over devices (default domain)"
    )
    g.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration for --partition dirichlet")
    g.add_argument("--eval-examples", type=int, default=16, help="held-out examples per domain (default 16)")
    g.add_argument(
        "--train-examples", type=int, default=256, help="training examples per domain, at most (0 = all; default 256)"
    )
    g.add_argument("--eval-seq-len", type=int, default=64, help="tokens per held-out example (default 64)")

    f = p.add_argument_group("fleet")
    f.add_argument("--devices", type=int, default=8, help="number of devices (default 8)")
    f.add_argument(
        "--classes", type=int, default=4, help="device classes, spread over the profiles' speeds (default 4)"
    )
    f.add_argument(
        "--profiles",
        default="",
        help="comma-separated profile names or .toml files to draw classes from (default: all)",
    )
    f.add_argument("--local-steps", type=int, help="override every profile's local steps per round")
    f.add_argument("--batch", type=int, help="override every profile's batch size")
    f.add_argument("--seq-len", type=int, help="override every profile's training sequence length")
    f.add_argument("--lr", type=float, help="override every profile's learning rate")
    f.add_argument(
        "--class-ranks",
        default="",
        help="LoRA rank cap of each device class, slowest first, e.g. 2,2,4,8 (0 = the bundle's rank; "
        "default: the profiles' max_rank)",
    )

    s = p.add_argument_group("strategies")
    s.add_argument("--strategies", default="all", help="variants to run: all, or a comma-separated list")
    s.add_argument("--k", type=int, help="buffer size K of fedbuff, fedstaleweight and alignfed (default N/3, ≥ 2)")
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TARGET.KEY=VALUE",
        help="a strategy option for a variant or strategy, e.g. alignfed.tau_max=16 or fedasync.alpha=0.4",
    )
    s.add_argument(
        "--byzantine", type=float, default=0.0, help="fraction of devices sending hostile updates (default 0)"
    )
    s.add_argument(
        "--attack",
        default="scale",
        choices=("scale", "signflip", "random", "mixed"),
        help="what Byzantine devices send: 10×Δ, −Δ, noise of Δ's norm, or each in turn (default scale)",
    )
    s.add_argument(
        "--max-delta-norm",
        type=float,
        default=IngestLimits().max_delta_norm,
        help="the coordinator's ingest bound on each layer delta's Frobenius norm, as coordinator.toml's "
        f"[ingest] max_delta_norm (default {IngestLimits().max_delta_norm:g}; inf turns it off)",
    )
    s.add_argument("--target-loss", type=float, help="time-to-target threshold (default: fedavg's final eval loss)")
    s.add_argument("--calibration-tokens", type=int, default=256, help="AlignFed calibration tokens n (default 256)")
    s.add_argument("--calibration-data", help="AlignFed calibration text (default: the calibration set in the bundle)")

    t = p.add_argument_group("virtual time and cost")
    t.add_argument("--horizon", type=float, default=3600.0, help="virtual seconds per run (default 3600)")
    t.add_argument("--max-versions", type=int, default=0, help="stop a run after this many versions (0 = no limit)")
    t.add_argument(
        "--wall-limit",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="stop each run after this many wall-clock seconds at the virtual time it reached; the report "
        "says where each run stopped (0 = no limit)",
    )
    t.add_argument(
        "--step-seconds",
        type=float,
        default=DEFAULT_STEP_S,
        help=f"one training step at step_speed 1.0 and 4x64 tokens (default {DEFAULT_STEP_S}, SmolLM2-135M int8)",
    )
    t.add_argument(
        "--no-duty-cycle", action="store_true", help="ignore the profiles' duty cycle (no rest between rounds)"
    )
    t.add_argument(
        "--wire",
        choices=list(QUANTIZATIONS),
        default="int8c",
        help="update factor encoding: int8c (one scale per rank component, default), int4c (the same in 4 bits), "
        "int8 (per row), fp32",
    )
    t.add_argument(
        "--codec",
        choices=list(CODECS),
        default="deflate",
        help="envelope of each update: deflate (lossless, default) or none (plain safetensors)",
    )
    t.add_argument("--delta-rank", type=int, default=0, help="rank of sent delta factors (0 = exact 2r)")
    t.add_argument(
        "--carry-rank", type=int, default=0, help="rank of the devices' error-feedback carry (0 = sent rank)"
    )
    t.add_argument(
        "--downlink",
        choices=["snapshot", *DOWNLINK_QUANTIZATIONS],
        default="snapshot",
        help="new versions reach devices as full float32 snapshots (default) or as version-to-version deltas "
        "quantized int4c / int8c / fp32, with a snapshot when a device misses one",
    )
    t.add_argument(
        "--downlink-feedback",
        choices=["carry", "residual", "off"],
        default="carry",
        help="where a delta downlink's quantization error goes: carry (added to the next version's change, "
        "default), residual (into the strategy's error feedback, in product space) or off",
    )
    t.add_argument(
        "--no-delta-feedback",
        action="store_true",
        help="devices drop what truncation/quantization loses instead of carrying it into the next update",
    )
    t.add_argument(
        "--optimizer",
        choices=["round", "device"],
        default="round",
        help="AdamW moments: fresh every round (default) or kept per device like the edge daemon",
    )
    t.add_argument("--eval-every", type=int, default=1, help="evaluate every n-th version (default 1)")
    t.add_argument(
        "--eval-interval",
        type=float,
        default=0.0,
        help="evaluate at most once per this many virtual seconds (default 0: no limit); evaluation cost "
        "then scales with the horizon, not with how many versions a strategy makes",
    )
    t.add_argument("--threads", type=int, default=1, help="ONNX Runtime / PyTorch threads (default 1)")
    t.add_argument(
        "--trainer",
        choices=["ort", "batched", "batched-bf16"],
        default="ort",
        help="ort: each round on ONNX Runtime, one device at a time (default); batched: the rounds of "
        "devices training at once in one PyTorch pass per step (a CUDA GPU when present), same results; "
        "batched-bf16: the same with the frozen base in bfloat16 (4-6x faster matmuls on CPUs with AMX or "
        "AVX-512 BF16, and on GPUs), losses within bfloat16's rounding of ORT's rather than equal",
    )
    t.add_argument("--seed", type=int, default=0, help="seed of data split, partition, batches and availability")

    a = p.add_argument_group("task accuracy")
    a.add_argument(
        "--gsm8k",
        metavar="PATH",
        help="GSM8K-style JSONL (question/answer): score each variant's final adapter by exact match of the "
        "final number, generating with llama.cpp on the bundle's GGUF base",
    )
    a.add_argument("--gsm8k-problems", type=int, default=20, help="problems to score (default 20)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="simulation-report", help="report folder (default ./simulation-report)")
    o.add_argument(
        "--save-adapters",
        action="store_true",
        help="write each variant's final global adapter to OUT/adapters/VARIANT/final.{safetensors,gguf} "
        "(the .gguf is a llama.cpp LoRA for the bundle's GGUF base)",
    )
    o.add_argument("--save-every", type=int, default=0, help="with --save-adapters: also every N-th version")
    o.add_argument(
        "--perplexity",
        metavar="FILE",
        help="score the final adapters (saved as with --save-adapters) and the bare base on this held-out "
        "text through llama.cpp; writes OUT/perplexity.md",
    )
    o.add_argument("--perplexity-tokens", type=int, default=4096, help="positions scored (default 4096)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument(
        "--dashboard",
        nargs="?",
        const="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="serve the live dashboard and /metrics while it runs (default address 127.0.0.1:8080)",
    )
    p.set_defaults(fn=simulate_main)
    return p


def parse_ranks(text: str) -> tuple[int, ...]:
    """`--class-ranks 2,2,4` -> (2, 2, 4); every entry an integer ≥ 0."""
    from alignfed.errors import ConfigError

    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not all(x.isdigit() for x in parts):
        raise ConfigError(f"--class-ranks {text!r}; expected comma-separated integers ≥ 0, e.g. 2,2,4,8")
    return tuple(int(x) for x in parts)


def configs(args: argparse.Namespace) -> tuple[TestbedConfig, ExperimentConfig]:
    """The testbed and experiment configs an argument namespace asks for."""
    from simulator.config import SimulationConfig
    from simulator.domains import parse_spec
    from simulator.experiment import ExperimentConfig
    from simulator.fleet import FleetConfig
    from simulator.partition import PartitionConfig
    from simulator.testbed import TestbedConfig
    from simulator.timing import Timing

    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("local_steps", args.local_steps),
            ("batch", args.batch),
            ("seq_len", args.seq_len),
            ("lr", args.lr),
        )
        if value is not None
    }
    profiles = tuple(x.strip() for x in args.profiles.split(",") if x.strip())
    testbed = TestbedConfig(
        bundle=Path(args.bundle),
        fleet=FleetConfig(
            devices=args.devices,
            classes=args.classes,
            profiles=profiles,
            overrides=overrides,
            class_ranks=parse_ranks(args.class_ranks),
        ),
        partition=PartitionConfig(kind=args.partition, alpha=args.alpha),
        data=tuple(parse_spec(spec) for spec in args.data),
        eval_examples=args.eval_examples,
        train_examples=args.train_examples,
        eval_seq_len=args.eval_seq_len,
        calibration_tokens=args.calibration_tokens,
        calibration_data=Path(args.calibration_data) if args.calibration_data else None,
        threads=args.threads,
        seed=args.seed,
        trainer=args.trainer,
    )
    simulation = SimulationConfig(
        horizon_s=args.horizon,
        max_versions=args.max_versions,
        wall_limit_s=args.wall_limit,
        wire_quantization=args.wire,
        wire_codec=args.codec,
        delta_rank=args.delta_rank,
        delta_feedback=not args.no_delta_feedback,
        carry_rank=args.carry_rank,
        downlink=args.downlink,
        downlink_feedback=args.downlink_feedback,
        optimizer=args.optimizer,
        eval_every=args.eval_every,
        eval_interval_s=args.eval_interval,
        timing=Timing(base_step_s=args.step_seconds, duty_cycle=not args.no_duty_cycle),
        seed=args.seed,
        byzantine=args.byzantine,
        attack=args.attack,
        limits=IngestLimits(max_delta_norm=args.max_delta_norm),
    )
    variants = select_variants([args.strategies], devices=args.devices, k=args.k, overrides=args.set)
    save = args.save_adapters or bool(args.perplexity)
    return testbed, ExperimentConfig(
        variants=tuple(variants),
        simulation=simulation,
        target_loss=args.target_loss,
        save_adapters=Path(args.out) / "adapters" if save else None,
        save_every=args.save_every,
    )


class _Bar:
    """A tqdm bar over one run's virtual horizon."""

    def __init__(self, variant: str, horizon: float) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=round(horizon),
            desc=f"{variant:22}",
            unit="vs",
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} virtual s [{elapsed}]",
        )
        self._shown = 0

    def __call__(self, now: float) -> None:
        step = int(now) - self._shown
        if step > 0:
            self._bar.update(step)
            self._shown += step

    def close(self) -> None:
        self._bar.close()


def simulate_main(args: argparse.Namespace, accuracy: AccuracyHook | None = None) -> int:
    """Run the experiment `args` describes and write its report; `accuracy` scores final adapters."""
    from simulator.experiment import run_experiment
    from simulator.report import write_report
    from simulator.testbed import Testbed

    testbed_cfg, experiment = configs(args)
    if accuracy is None and getattr(args, "gsm8k", None):
        from simulator.accuracy import GenerationAccuracy, gsm8k_problems, llama_generate

        accuracy = GenerationAccuracy(
            llama_generate(Path(args.bundle)), gsm8k_problems(Path(args.gsm8k), args.gsm8k_problems, seed=args.seed)
        )
    print(f"building the testbed: {args.devices} devices, bundle {args.bundle}", flush=True)
    testbed = Testbed.build(testbed_cfg)
    names = ", ".join(v.name for v in experiment.variants)
    print(f"running {len(experiment.variants)} variant(s) for {args.horizon:g} virtual s each: {names}", flush=True)
    out = Path(args.out)
    live = _dashboard(args.dashboard, experiment) if getattr(args, "dashboard", None) else None
    result = run_experiment(
        testbed,
        experiment,
        accuracy=accuracy,
        progress=None if args.no_progress else _Bar,
        on_variant=lambda partial: write_report(partial, testbed, experiment.simulation, out),
        events=live[1] if live is not None else None,
    )
    if live is not None:
        live[0].stop()
    files = write_report(result, testbed, experiment.simulation, out)
    width = max(len(s.variant) for s in result.summaries)
    print(f"{'variant':{width}}  final loss  late mean  worst device  time-to-target  Jain", flush=True)
    for s in result.summaries:
        ttt = f"{s.time_to_target_s:.0f} s" if s.time_to_target_s is not None else "—"
        print(
            f"{s.variant:{width}}  {s.final_loss:10.4f}  {s.late_loss:9.4f}  {s.worst_device_loss:12.4f}  "
            f"{ttt:>14}  {s.jain:.3f}"
        )
    if files.plots_skipped:
        print(files.plots_skipped)
    if result.saved:
        print(f"adapters: {out / 'adapters'} (safetensors + llama.cpp GGUF LoRA per variant)", flush=True)
    if args.perplexity:
        from simulator.perplexity import markdown, score_adapters

        rows = score_adapters(
            Path(args.bundle),
            Path(args.perplexity),
            {name: s.gguf for name, s in result.saved.items()},
            max_tokens=args.perplexity_tokens,
        )
        (out / "perplexity.md").write_text(markdown(rows, Path(args.perplexity)))
        for r in rows:
            print(f"perplexity {r.model:24} {r.perplexity:10.3f}  ({r.tokens} tokens)", flush=True)
    print(f"report: {files.markdown}", flush=True)
    return 0


def _dashboard(address: str, experiment: ExperimentConfig) -> tuple[LiveDashboard, Callable[[str], VariantFeed]]:
    """The live dashboard for this run and its per-variant feed factory (simulator/live.py)."""
    from dashboard.config import parse_address
    from dashboard.live import LiveDashboard
    from simulator.live import feeds

    live = LiveDashboard(parse_address(address), federation="simulation")
    url = live.start()
    print(f"dashboard: {url} (Prometheus metrics: {url}metrics)", flush=True)
    return live, feeds(live, {v.name: v.strategy for v in experiment.variants})
