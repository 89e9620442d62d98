"""MuJoCo benchmark: the manager rescuing a cautious PPO recipe and taming a reckless one.

For each seed and each recipe (``cautious``, ``reckless``) it trains
``train_scripts/mujoco_reacher.py`` (PPO on ReacherObstacle-v0, evaluated on fixed easy /
medium / hard splits) three ways on the same budget:

- ``fixed``: the recipe untouched;
- ``rules``: managed by the rules policy, one decision per evaluation, applied at its boundary;
- ``llm``: managed by the LLM policy (the embedded model, or an OpenAI-compatible endpoint with
  ``--llm-base-url``/``--llm-model``).

Runs go two at a time (``--parallel``), one CPU thread each. Writes ``OUT/results.json`` (one
object per run), ``OUT/results.md`` and ``OUT/curves.png`` (safe success and collision rate
over env steps, intervention markers), logged to a ``summary`` run of the benchmark's MLflow
experiment, and a filmstrip of each seed-0 managed run's final policy where MuJoCo can render.
Run from the repository root::

    python train_scripts/bench_mujoco.py --preset cpu --seeds 3 --out bench/mujoco
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

from integrations.protocol import Command
from integrations.trackers import Tracker, open_tracker
from manager_daemon.settings import DaemonSettings
from manager_daemon.supervisor import SupervisorConfig
from manager_daemon.validation import ValidationConfig
from train_scripts.bench_common import (
    daemons,
    interventions,
    log_summary,
    mean_sd,
    metric_curve,
    run_script,
    tracking_uri,
)
from train_scripts.mujoco_reacher import PRESETS, RECIPES
from train_scripts.reacher_obstacle import EVAL_SPLITS

matplotlib.use("Agg")
import matplotlib.pyplot as plt

log = logging.getLogger("bench_mujoco")

SCRIPT = Path(__file__).with_name("mujoco_reacher.py")
EXPERIMENT = "mujoco-bench"
MANAGED = ("rules", "llm")
VARIANTS = ("fixed", *MANAGED)
ROLLBACK = Command.ROLLBACK_TO_BEST.value
COLORS = {"fixed": "tab:red", "rules": "tab:blue", "llm": "tab:green"}


@dataclass
class Result:
    recipe: str
    variant: str
    seed: int
    run_id: str
    safe_success: float
    collision: float
    splits: dict[str, dict[str, float]]
    best_safe_success: float
    env_steps: int
    wall_s: float
    interventions: list[dict[str, object]] = field(default_factory=list)
    rollbacks: int = 0
    training_collision: float | None = None  # per training episode, over the whole run
    training_collision_end: float | None = None  # over the last evaluation period
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/mujoco"))
    parser.add_argument("--recipes", default="cautious,reckless", help="comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--llm-base-url", help="an OpenAI-compatible endpoint for the llm variant")
    parser.add_argument("--llm-model", help="the endpoint's model name")
    parser.add_argument("--no-filmstrip", action="store_true", help="skip rendering")
    args = parser.parse_args(argv)
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.variants = [v for v in args.variants.split(",") if v]
    if unknown := set(args.recipes) - set(RECIPES):
        parser.error(f"unknown recipes {sorted(unknown)}: expected some of {sorted(RECIPES)}")
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}: expected some of {VARIANTS}")
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


# The safe success a rescued cautious run reaches (the benchmark's target).
SAFE_SUCCESS_TARGET = 0.9


def supervisor_config(preset: str, variant: str = "rules") -> SupervisorConfig:
    """One decision per evaluation at most; the rules' answers are stale a whole evaluation
    later, the LLM's after four.

    The embedded model answers in 30 s or so on one core here, two to three evaluation periods
    of the cpu preset: every one of its answers would be stale at one. What it answers to a run
    that has learned nothing, or explores unsafely, is still worth applying three evaluations
    later.

    The daemon decides once per new evaluation anyway. The cooldown, counted from the step the
    daemon had seen when it decided (a few updates past the evaluation, more or fewer each
    time), keeps a knob from changing twice within half an evaluation period: a full period
    would block the next evaluation's decision whenever the previous one was seen late.
    """
    p = PRESETS[preset]
    between_evals = p.eval_every * p.n_envs * p.n_steps
    return SupervisorConfig(
        validation=ValidationConfig(
            cooldown_steps=between_evals // 2,
            stop_after_evals=4,
            rollback_min_regression=0.1,
        ),
        stale_evals=1 if variant == "rules" else 4,
    )


def run_all(args: argparse.Namespace, uri: str) -> list[Result]:
    # What good is here, so the rules can tell slow progress from enough of it.
    rules = args.out / "rules.yaml"
    rules.parent.mkdir(parents=True, exist_ok=True)
    rules.write_text(f"progress_target: {SAFE_SUCCESS_TARGET}\n")
    policies = {
        v: DaemonSettings.from_options(
            policy="rules" if v == "rules" else "llm",
            llm_base_url=args.llm_base_url,
            llm_model=args.llm_model,
            rules_config=rules,
        )
        for v in MANAGED
        if v in args.variants
    }
    experiments = {v: f"{EXPERIMENT}-{v}" for v in MANAGED}
    jobs = [
        (recipe, variant, seed)
        for seed in range(args.seeds)
        for recipe in args.recipes
        for variant in args.variants
    ]
    configs = {v: supervisor_config(args.preset, v) for v in policies}
    with daemons(uri, policies, configs, experiments), ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda job: train(*job, args, uri), jobs))
    tracker = open_tracker(uri)
    for r in results:
        read_back(r, tracker, uri, PRESETS[args.preset].eval_every)
    return results


def read_back(r: Result, tracker: Tracker, uri: str, eval_every: int) -> None:
    """Curves, interventions and training-episode collision rates of a finished run."""
    r.curves = {k: metric_curve(uri, r.run_id, f"eval/{k}") for k in ("safe_success", "collision")}
    r.curves["training_collision"] = metric_curve(uri, r.run_id, "rollout/collision_rate")
    rates = [v for _, v in r.curves["training_collision"]]
    if rates:
        r.training_collision = statistics.fmean(rates)
        r.training_collision_end = statistics.fmean(rates[-eval_every:])
    if r.variant in MANAGED:
        r.interventions = interventions(tracker, uri, r.run_id)
        r.rollbacks = sum(ROLLBACK in i["commands"] for i in r.interventions)  # type: ignore[operator]


def train(recipe: str, variant: str, seed: int, args: argparse.Namespace, uri: str) -> Result:
    name = f"{recipe}-{variant}-s{seed}"
    experiment = f"{EXPERIMENT}-{variant}" if variant in MANAGED else f"{EXPERIMENT}-fixed"
    cmd = [
        sys.executable,
        str(SCRIPT),
        *("--recipe", recipe, "--preset", args.preset, "--seed", str(seed)),
        *("--tracking-uri", uri, "--experiment", experiment, "--variant", variant),
    ]
    if variant in MANAGED:
        cmd.append("--managed")
        if seed == 0 and not args.no_filmstrip:
            cmd += ["--filmstrip", "--out", str(args.out / "filmstrips" / name)]
    s = run_script(cmd, args.out / "logs" / f"{name}.log")
    log.info(
        "%s: safe success %.2f, collision %.2f, %d env steps, %.0f s",
        name, s["safe_success"], s["collision"], s["env_steps"], s["wall_s"],
    )  # fmt: skip
    return Result(
        recipe=recipe,
        variant=variant,
        seed=seed,
        run_id=str(s["run_id"]),
        safe_success=float(s["safe_success"]),  # type: ignore[arg-type]
        collision=float(s["collision"]),  # type: ignore[arg-type]
        splits={
            split: {k: float(s[f"{split}/{k}"]) for k in ("safe_success", "collision")}  # type: ignore[arg-type]
            for split in EVAL_SPLITS
        },
        best_safe_success=float(s["best_safe_success"]),  # type: ignore[arg-type]
        env_steps=int(s["env_steps"]),  # type: ignore[call-overload]
        wall_s=float(s["wall_s"]),  # type: ignore[arg-type]
    )


# ---- reporting ----------------------------------------------------------------------------


def report(results: list[Result], args: argparse.Namespace, uri: str) -> None:
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    table = results_markdown(results, args)
    (args.out / "results.md").write_text(table)
    plot(results, args.out / "curves.png")
    print(table, flush=True)
    files = [args.out / n for n in ("results.json", "results.md", "curves.png")]
    tags = {"preset": args.preset, "seeds": str(args.seeds)}
    log_summary(uri, EXPERIMENT, f"summary-{args.preset}-{args.seeds}seeds", files, tags)


def results_markdown(results: list[Result], args: argparse.Namespace) -> str:
    p = PRESETS[args.preset]
    lines = [
        f"# MuJoCo ReacherObstacle benchmark, preset `{args.preset}`, {args.seeds} seed(s)",
        "",
        f"PPO, {p.n_envs} envs × {p.n_steps} steps × {p.updates} updates = {p.env_steps:,} env "
        f"steps per run; evaluation every {p.eval_every} updates; deterministic policy on the "
        "easy / medium / hard splits. Final evaluation, mean ± sd over seeds.",
        "",
        "| recipe | variant | safe success | collision | "
        + " | ".join(f"{s} success / collision" for s in EVAL_SPLITS)
        + " | collision in training (whole run, last period) | interventions | rollbacks |",
        "|---|---|---|---|" + "---|" * len(EVAL_SPLITS) + "---|---|---|",
    ]
    for recipe in args.recipes:
        for variant in args.variants:
            runs = [r for r in results if r.recipe == recipe and r.variant == variant]
            if not runs:
                continue
            splits = [
                f"{mean_sd([r.splits[s]['safe_success'] for r in runs], '.2f')} / "
                f"{mean_sd([r.splits[s]['collision'] for r in runs], '.2f')}"
                for s in EVAL_SPLITS
            ]
            lines.append(
                f"| {recipe} | {variant} | {mean_sd([r.safe_success for r in runs], '.2f')} | "
                f"{mean_sd([r.collision for r in runs], '.2f')} | "
                + " | ".join(splits)
                + f" | {mean_sd([r.training_collision or 0.0 for r in runs], '.2f')}, "
                f"{mean_sd([r.training_collision_end or 0.0 for r in runs], '.2f')}"
                + f" | {mean_sd([len(r.interventions) for r in runs], '.1f')} | "
                f"{mean_sd([r.rollbacks for r in runs], '.1f')} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path) -> None:
    recipes = sorted({r.recipe for r in results})
    metrics = ("safe_success", "collision", "training_collision")
    fig, axes = plt.subplots(3, len(recipes), figsize=(6 * len(recipes), 10), squeeze=False)
    for col, recipe in enumerate(recipes):
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            for r in (r for r in results if r.recipe == recipe):
                curve = r.curves.get(metric) or []
                if not curve:
                    continue
                steps, values = zip(*curve, strict=True)
                label = f"{r.variant} s{r.seed}"
                ax.plot(steps, values, color=COLORS[r.variant], alpha=0.8, label=label)
                for item in r.interventions:
                    step = item["applied_step"] or item["decision_step"]
                    y = min(curve, key=lambda p: abs(p[0] - step))[1]  # type: ignore[operator]
                    marker = "x" if ROLLBACK in item["commands"] else "v"  # type: ignore[operator]
                    ax.plot([step], [y], marker=marker, color=COLORS[r.variant], markersize=7)
            what = {"collision": "collision (evaluation)"}.get(metric, metric.replace("_", " "))
            ax.set(title=f"{recipe}: {what}", xlabel="env steps")
            ax.set_ylim(-0.05, 1.05)
            if row == 0:
                ax.legend(fontsize="x-small", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
