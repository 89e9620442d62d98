"""Benchmark: the LLM policy over recorded decision situations.

For each recorded snapshot and menu (``tests/data/decision_snapshots.json``) the policy is
asked once, as the daemon would ask it. Measured per case: whether the first answer passed
validation, whether a valid decision came out at all (after the one retry), the action chosen,
latency, and prompt/completion tokens. The embedded model is used unless an endpoint is given.

    python train_scripts/bench_llm_decisions.py [--base-url URL --model NAME] [--out DIR]
        [--mode compose|choose] [--consult always|on_symptom] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from integrations.protocol import RunSpec, Source
from manager_daemon.policies.llm import LLMConfig, LLMPolicy
from manager_daemon.policies.local_model import LocalChat
from manager_daemon.policies.openai_chat import OpenAIChat
from manager_daemon.telemetry import Snapshot
from manager_daemon.validation import Menu, RunState, ValidationConfig, validate

CASES = Path(__file__).resolve().parents[1] / "tests" / "data" / "decision_snapshots.json"


def load_cases(path: Path = CASES) -> list[dict]:
    return json.loads(path.read_text())


def run_case(policy: LLMPolicy, case: dict) -> dict[str, object]:
    spec = RunSpec.model_validate(case["spec"])
    snapshot = Snapshot.model_validate(case["snapshot"])
    menu = Menu.model_validate(case["menu"])
    state = RunState(spec=spec, **case["state"])
    started = time.monotonic()
    answer = policy.propose(snapshot, menu)
    elapsed = time.monotonic() - started
    result = validate(answer.proposal, state, ValidationConfig(cooldown_steps=40), Source.LLM)
    rejected = [v.knob for v in result.verdicts if v.verdict == "rejected"]
    return {
        "case": case["name"],
        "expected": case["expected"],
        "action": answer.proposal.action,
        "changes": answer.proposal.changes,
        "commands": answer.proposal.commands,
        "reason": answer.proposal.reason,
        "consulted": answer.model is not None,
        "first_try_valid": answer.error is None and answer.usage.get("attempts") == 1,
        "valid": answer.error is None and not rejected,
        "error": answer.error,
        "seconds": round(elapsed, 3),
        "prompt_tokens": answer.usage.get("prompt_tokens"),
        "cached_tokens": answer.usage.get("cached_tokens", 0),
        "completion_tokens": answer.usage.get("completion_tokens"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--mode", choices=("auto", "compose", "choose"), default="auto")
    parser.add_argument("--consult", choices=("auto", "always", "on_symptom"), default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="embedded model threads (llama.cpp default)"
    )
    args = parser.parse_args()
    if args.base_url or args.model:
        model = OpenAIChat(args.model or "default", base_url=args.base_url)
    else:
        model = LocalChat(n_threads=args.threads)
    policy = LLMPolicy(
        model,
        LLMConfig(timeout_s=args.timeout, fallback="none", mode=args.mode, consult=args.consult),
    )
    rows = [run_case(policy, case) for case in load_cases()]
    for row in rows:
        print(
            f"{row['case']:32} {row['action']:10} "
            f"{'first-try ' + str(row['first_try_valid']) if row['consulted'] else 'not asked':16}"
            f"{row['seconds']:6.2f} s {row['prompt_tokens']} tok "
            f"{row['changes'] or row['commands']} | {str(row['reason'])[:70]}"
        )
    asked = [r for r in rows if r["consulted"]] or rows
    summary = {
        "model": model.name,
        "cases": len(rows),
        "consulted": sum(bool(r["consulted"]) for r in rows),
        "first_try_valid_share": sum(bool(r["first_try_valid"]) for r in asked) / len(asked),
        "valid_share": sum(bool(r["valid"]) for r in rows) / len(rows),
        "median_seconds": statistics.median(float(r["seconds"]) for r in asked),  # type: ignore[arg-type]
        "max_seconds": max(float(r["seconds"]) for r in asked),  # type: ignore[arg-type]
        "threads": args.threads,
        "mode": args.mode,
        "consult": args.consult,
        "median_prompt_tokens": statistics.median(int(r["prompt_tokens"] or 0) for r in asked),  # type: ignore[call-overload]
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "llm_decisions.json").write_text(
            json.dumps({"summary": summary, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
