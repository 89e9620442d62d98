"""TinyStories benchmark: the manager against fixed recipes, on the same data and budget.

For each seed it trains ``train_scripts/tinystories.py`` as

- ``fixed``: the preset's overfitting recipe, untouched;
- ``rules``: the same start under ``atm run``, supervised by the rules policy;
- ``llm``: the same start under ``atm run``, supervised by the LLM policy (the embedded model,
  or an OpenAI-compatible endpoint with ``--llm-base-url``/``--llm-model``);
- ``plateau``: the fixed recipe plus ``ReduceLROnPlateau``, early stopping and the best
  checkpoint restored, which is what a careful engineer does without a supervisor;

and a sweep of starting learning rates, fixed and managed by rules, for the sensitivity to the
starting recipe. Runs go two at a time (``--parallel``), each on one CPU thread; ``fixed`` and
``rules`` of one seed run side by side, so their steps/s are compared under the same load.

Writes ``OUT/results.json`` (one object per run), ``OUT/results.md`` (the tables, with ratios)
and ``OUT/eval_loss.png`` / ``OUT/lr_sweep.png`` (eval-loss curves with intervention markers),
and logs them to a ``summary`` run in the benchmark's MLflow experiment. Run from the repository
root::

    python train_scripts/bench_tinystories.py --preset cpu --seeds 5 --out bench/tinystories
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

from integrations.trackers import open_tracker
from manager_daemon.settings import DaemonSettings
from manager_daemon.supervisor import SupervisorConfig
from manager_daemon.validation import ValidationConfig
from train_scripts.bench_common import (
    daemons,
    interventions,
    log_summary,
    metric_curve,
    metric_timeline,
    run_script,
    tracking_uri,
)
from train_scripts.bench_common import mean_sd as _ms
from train_scripts.tinystories import PRESETS, SOURCES

matplotlib.use("Agg")
import matplotlib.pyplot as plt

log = logging.getLogger("bench_tinystories")

SCRIPT = Path(__file__).with_name("tinystories.py")
EXPERIMENT = "tinystories-bench"
MANAGED = ("rules", "llm")
VARIANTS = ("fixed", "rules", "llm", "plateau")
COLORS = {"fixed": "tab:red", "rules": "tab:blue", "llm": "tab:green", "plateau": "tab:orange"}


@dataclass
class Job:
    variant: str
    seed: int
    learning_rate: float
    sweep: bool = False


@dataclass
class Result:
    variant: str
    seed: int
    learning_rate: float
    sweep: bool
    run_id: str
    data_source: str
    final_eval_loss: float
    best_eval_loss: float
    steps: int
    steps_per_s: float
    wall_s: float
    interventions: list[dict[str, object]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    paired_steps_per_s: float | None = None
    steps_per_s_before_interventions: float | None = None
    wave: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/tinystories"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument(
        "--lr-factors",
        default="0.33,3",
        help="sweep: starting lrs as factors of the preset's (empty: no sweep)",
    )
    parser.add_argument("--parallel", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument(
        "--source",
        choices=["auto", *SOURCES],
        default="auto",
        help="tinystories.py --source (auto: --data if given, else the preset's own data)",
    )
    parser.add_argument("--data", type=Path, help="tinystories.py --data")
    parser.add_argument("--llm-base-url", help="an OpenAI-compatible endpoint for the llm variant")
    parser.add_argument("--llm-model", help="the endpoint's model name")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}: expected some of {VARIANTS}")
    try:
        args.lr_factors = [float(f) for f in args.lr_factors.split(",") if f]
    except ValueError:
        parser.error(f"--lr-factors {args.lr_factors!r}: expected numbers separated by commas")
    if args.seeds < 1 or args.parallel < 1:
        parser.error("--seeds and --parallel must be at least 1")
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    with tracking_uri(args.out) as uri:
        log.info("MLflow: %s", uri)
        results = run_all(args, uri)
        report(results, args, uri)
    return results


# ---- running ------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[list[Job]]:
    """Waves of jobs that run side by side: fixed beside rules, llm beside plateau."""
    lr = PRESETS[args.preset].recipe.learning_rate
    jobs: list[Job] = []
    for seed in range(args.seeds):
        jobs += [Job(v, seed, lr) for v in VARIANTS if v in args.variants]
        for factor in args.lr_factors:
            jobs += [Job(v, seed, lr * factor, sweep=True) for v in ("fixed", "rules")]
    return [jobs[i : i + args.parallel] for i in range(0, len(jobs), args.parallel)]


def run_all(args: argparse.Namespace, uri: str) -> list[Result]:
    eval_steps = PRESETS[args.preset].recipe.eval_steps
    config = SupervisorConfig(
        validation=ValidationConfig(cooldown_steps=2 * eval_steps), stale_evals=8
    )
    policies = {
        variant: DaemonSettings.from_options(
            policy="rules" if variant == "rules" else "llm",
            llm_base_url=args.llm_base_url,
            llm_model=args.llm_model,
        )
        for variant in MANAGED
        if variant in args.variants or (variant == "rules" and args.lr_factors)
    }
    experiments = {v: f"{EXPERIMENT}-{v}" for v in MANAGED}
    results: list[Result] = []
    with daemons(uri, policies, dict.fromkeys(policies, config), experiments):
        for index, wave in enumerate(plan(args)):
            with ThreadPoolExecutor(len(wave)) as pool:
                done = list(pool.map(lambda job: train(job, args, uri), wave))
            for r in done:
                r.wave = index
            results += done
            for r in done:
                log.info(
                    "%-7s seed %d lr %.2g: final %.3f best %.3f, %d steps, %.2f steps/s",
                    r.variant, r.seed, r.learning_rate, r.final_eval_loss, r.best_eval_loss,
                    r.steps, r.steps_per_s,
                )  # fmt: skip
    tracker = open_tracker(uri)
    for r in results:
        r.eval_curve = metric_curve(uri, r.run_id, "eval_loss")
        if r.variant in MANAGED:
            r.interventions = interventions(tracker, uri, r.run_id)
    for index in sorted({r.wave for r in results}):
        pair_steps_per_s([r for r in results if r.wave == index], uri)
    return results


def train(job: Job, args: argparse.Namespace, uri: str) -> Result:
    experiment = f"{EXPERIMENT}-{job.variant}" if job.variant in MANAGED else f"{EXPERIMENT}-fixed"
    name = f"{job.variant}-s{job.seed}-lr{job.learning_rate:.2g}"
    cmd = [
        sys.executable,
        str(SCRIPT),
        *("--preset", args.preset, "--seed", str(job.seed), "--threads", "1"),
        *("--learning-rate", repr(job.learning_rate), "--source", args.source),
        *("--tracking-uri", uri, "--experiment", experiment, "--run-name", name),
        *("--tag", f"bench.variant={job.variant}", "--tag", f"bench.sweep={job.sweep}"),
        *(["--data", str(args.data)] if args.data else []),
        *(["--plateau"] if job.variant == "plateau" else []),
    ]
    if job.variant in MANAGED:
        atm = [sys.executable, "-m", "manager_daemon.cli", "run", "--tracking-uri", uri]
        cmd = [*atm, "--objective", "minimize:eval_loss", "--", *cmd]
    started = time.monotonic()
    s = run_script(cmd, args.out / "logs" / f"{name}.log")
    return Result(
        variant=job.variant,
        seed=job.seed,
        learning_rate=job.learning_rate,
        sweep=job.sweep,
        run_id=str(s["run_id"]),
        data_source=str(s["data_source"]),
        final_eval_loss=float(s["final_eval_loss"]),  # type: ignore[arg-type]
        best_eval_loss=float(s["best_eval_loss"]),  # type: ignore[arg-type]
        steps=int(s["steps"]),  # type: ignore[call-overload]
        steps_per_s=float(s["steps_per_s"]),  # type: ignore[arg-type]
        wall_s=time.monotonic() - started,
    )


def pair_steps_per_s(wave: list[Result], uri: str) -> None:
    """Steps/s of each run over the steps that every run of the wave trained side by side, and
    over those before any run of the wave was changed by the manager.

    A managed run that stops early leaves its neighbour the machine to itself, and a remedy may
    make steps dearer (dropout): comparing whole runs would count either as the manager's cost.
    """
    curves = {r.run_id: metric_timeline(uri, r.run_id, "loss") for r in wave}
    common = min((c[-1][0] for c in curves.values() if c), default=0)
    changed = [
        int(i["applied_step"] or i["decision_step"])  # type: ignore[call-overload]
        for r in wave
        for i in r.interventions
    ]
    clean = min([common, *changed])
    for r in wave:
        r.paired_steps_per_s = _rate(curves[r.run_id], common)
        r.steps_per_s_before_interventions = _rate(curves[r.run_id], clean)


def _rate(timeline: list[tuple[int, float]], until: int) -> float | None:
    points = [(s, t) for s, t in timeline if s <= until]
    if len(points) < 2 or points[-1][1] <= points[0][1]:
        return None
    return (points[-1][0] - points[0][0]) / (points[-1][1] - points[0][1])


# ---- reporting ----------------------------------------------------------------------------


def report(results: list[Result], args: argparse.Namespace, uri: str) -> None:
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    table = results_markdown(results, args)
    (args.out / "results.md").write_text(table)
    plot_curves(results, args.out / "eval_loss.png")
    sweep = [r for r in results if r.sweep or r.variant in ("fixed", "rules")]
    if any(r.sweep for r in results):
        plot_sweep(sweep, args.out / "lr_sweep.png")
    print(table, flush=True)
    files = [args.out / n for n in ("results.json", "results.md", "eval_loss.png", "lr_sweep.png")]
    tags = {"preset": args.preset, "seeds": str(args.seeds)}
    log_summary(uri, EXPERIMENT, f"summary-{args.preset}-{args.seeds}seeds", files, tags)


def results_markdown(results: list[Result], args: argparse.Namespace) -> str:
    main_runs = [r for r in results if not r.sweep]
    fixed = {r.seed: r for r in main_runs if r.variant == "fixed"}
    recipe = PRESETS[args.preset].recipe
    lines = [
        f"# TinyStories benchmark, preset `{args.preset}`, {args.seeds} seed(s)",
        "",
        f"Data: {sorted({r.data_source for r in results})}; {recipe.max_steps} steps, "
        f"eval every {recipe.eval_steps}; starting lr {recipe.learning_rate:g}, weight decay "
        f"{recipe.weight_decay:g}, dropout {recipe.dropout:g}.",
        "",
        "| variant | final eval loss | best eval loss | final / fixed | steps | "
        "interventions | steps/s (side by side) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        runs = [r for r in main_runs if r.variant == variant]
        if not runs:
            continue
        ratios = [
            r.final_eval_loss / fixed[r.seed].final_eval_loss for r in runs if r.seed in fixed
        ]
        paired = [r.paired_steps_per_s for r in runs if r.paired_steps_per_s]
        lines.append(
            f"| {variant} | {_ms([r.final_eval_loss for r in runs])} | "
            f"{_ms([r.best_eval_loss for r in runs])} | {_ms(ratios)} | "
            f"{_ms([r.steps for r in runs], '.0f')} | "
            f"{_ms([len(r.interventions) for r in runs], '.1f')} | "
            f"{_ms(paired, '.2f') if paired else 'n/a'} |"
        )
    lines += ["", *comparisons(main_runs), *sweep_lines(results)]
    return "\n".join(lines) + "\n"


def comparisons(runs: list[Result]) -> list[str]:
    by = {(r.variant, r.seed): r for r in runs}
    out = []
    for managed in MANAGED:
        for other in ("fixed", "plateau"):
            ratios = [
                by[(managed, s)].final_eval_loss / by[(other, s)].final_eval_loss
                for (v, s) in by
                if v == managed and (other, s) in by
            ]
            if ratios:
                out.append(f"- final eval loss {managed} / {other}: {_ms(ratios)} (per seed)")
    pairs = [
        (by[("rules", s)], by[("fixed", s)]) for (v, s) in by if v == "rules" and ("fixed", s) in by
    ]
    for attr, what in (
        ("steps_per_s_before_interventions", "before the first intervention"),
        ("paired_steps_per_s", "over all the steps both trained, remedies included"),
    ):
        ratios = [
            getattr(m, attr) / getattr(f, attr)
            for m, f in pairs
            if getattr(m, attr) and getattr(f, attr)
        ]
        if ratios:
            out.append(
                f"- steps/s with the manager on / off (rules beside fixed), {what}: "
                f"{_ms(ratios, '.3f')}"
            )
    return out


def sweep_lines(results: list[Result]) -> list[str]:
    """Spread of final eval loss across starting lrs, fixed vs managed (rules), per seed."""
    lrs = sorted({r.learning_rate for r in results if r.sweep})
    if not lrs:
        return []
    all_lrs = sorted({*lrs, *(r.learning_rate for r in results if not r.sweep)})
    out = [
        "",
        "## Starting learning rate sweep (final eval loss, mean over seeds)",
        "",
        "| starting lr | fixed | managed (rules) | managed / fixed |",
        "|---|---|---|---|",
    ]
    final = {(r.variant, r.seed, r.learning_rate): r.final_eval_loss for r in results}
    seeds = sorted({r.seed for r in results})
    for lr in all_lrs:
        f = [final[("fixed", s, lr)] for s in seeds if ("fixed", s, lr) in final]
        m = [final[("rules", s, lr)] for s in seeds if ("rules", s, lr) in final]
        ratio = statistics.mean(m) / statistics.mean(f) if f and m else float("nan")
        out.append(f"| {lr:.2g} | {_ms(f)} | {_ms(m)} | {ratio:.2f} |")
    spreads: dict[str, list[float]] = {"fixed": [], "rules": []}
    for s in seeds:
        for v in spreads:
            values = [final[(v, s, lr)] for lr in all_lrs if (v, s, lr) in final]
            if len(values) == len(all_lrs):
                spreads[v].append(max(values) - min(values))
    if spreads["fixed"] and spreads["rules"]:
        narrower = [f / m for f, m in zip(spreads["fixed"], spreads["rules"], strict=True) if m]
        out += [
            "",
            f"- spread (max − min final eval loss across starting lrs): fixed "
            f"{_ms(spreads['fixed'])}, managed {_ms(spreads['rules'])}; managed is "
            f"{_ms(narrower, '.1f')}× narrower (per seed)",
        ]
    return out


def plot_curves(results: list[Result], path: Path) -> None:
    runs = [r for r in results if not r.sweep]
    seeds = sorted({r.seed for r in runs})
    fig, axes = plt.subplots(1, len(seeds), figsize=(5 * len(seeds), 4), squeeze=False)
    for ax, seed in zip(axes[0], seeds, strict=True):
        for r in (r for r in runs if r.seed == seed):
            _plot_run(ax, r, r.variant)
        ax.set(title=f"seed {seed}", xlabel="step", ylabel="eval loss")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(results: list[Result], path: Path) -> None:
    lrs = sorted({r.learning_rate for r in results})
    fig, axes = plt.subplots(1, len(lrs), figsize=(5 * len(lrs), 4), squeeze=False)
    for ax, lr in zip(axes[0], lrs, strict=True):
        for r in (r for r in results if r.learning_rate == lr and r.variant in ("fixed", "rules")):
            _plot_run(ax, r, f"{r.variant} s{r.seed}")
        ax.set(title=f"starting lr {lr:.2g}", xlabel="step", ylabel="eval loss")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_run(ax: plt.Axes, r: Result, label: str) -> None:
    if not r.eval_curve:
        return
    steps, losses = zip(*r.eval_curve, strict=True)
    ax.plot(steps, losses, color=COLORS[r.variant], label=label, alpha=0.85)
    for item in r.interventions:
        step = item["applied_step"] or item["decision_step"]
        y = min(r.eval_curve, key=lambda p: abs(p[0] - step))[1]  # type: ignore[operator]
        marker = "x" if item["commands"] else "v"
        ax.plot([step], [y], marker=marker, color=COLORS[r.variant], markersize=8)


if __name__ == "__main__":
    main()
