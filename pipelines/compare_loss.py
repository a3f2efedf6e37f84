"""Compare a run's per-step training loss with a reference run's.

    python pipelines/compare_loss.py RUN_LOG REFERENCE_LOG [--skip 50] [--plot out.png]
                                     [--max-rel 0.05] [--max-abs 0.0002] [--signed]

Each log is either a run's steps.jsonl (one {"step", "epoch", "loss", "lr"} object per
optimizer step) or a text log with one loss per line, e.g.

    Epoch: 0 Iteration: 12  rank : 0  train.loss : 0.9521  train.ips : 95.1 imgs/s
    ... loss 0.9521 ...   /   loss: 0.9521   /   loss=0.9521

In text logs a line's step is its Iteration/iter/step number (numbered 1, 2, 3, ... in file
order instead when iterations restart each epoch; shifted by one when they start at 0, to
match the 1-based steps.jsonl); in logs without such numbers the loss lines are counted in
order. Lines from ranks other than 0 are skipped.

The two logs are aligned on their common steps, steps <= --skip are dropped, and the mean
relative error mean(|run - ref| / |ref|) and mean absolute error mean(|run - ref|) are
computed (with --signed, over run - ref, so errors can cancel). The run passes when either
mean is within its threshold. The last line printed is a JSON summary.

Exit status: 0 pass, 1 fail, 2 unreadable input (missing file, no loss lines, no common steps).
"""
import argparse
import json
import math
import os
import re
import sys

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_LOSS = re.compile(rf"\bloss\b\s*[:=]?\s*({_NUMBER})", re.IGNORECASE)
_EPOCH = re.compile(r"\bepoch\b\s*[:=]?\s*\[?\s*(\d+)", re.IGNORECASE)
_ITERATION = re.compile(r"\b(?:iteration|iter|step)\b\s*[:=]?\s*(\d+)", re.IGNORECASE)
_RANK = re.compile(r"\brank\b\s*[:=]?\s*(\d+)", re.IGNORECASE)


def read_log(path: str) -> dict[int, float]:
    """Step -> loss from a steps.jsonl or a text training log."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    try:
        losses = _read_jsonl(lines) if lines and _is_json_object(lines[0]) else _read_text(lines)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not losses:
        raise ValueError(f"{path}: no loss lines")
    return losses


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _read_jsonl(lines: list[str]) -> dict[int, float]:
    losses = {}
    for line in lines:
        if not _is_json_object(line):
            raise ValueError(f"not a JSON object: {line.strip()[:80]!r}")
        record = json.loads(line)
        if "step" in record and "loss" in record:
            losses[int(record["step"])] = float(record["loss"])
    return losses


def _read_text(lines: list[str]) -> dict[int, float]:
    rows = []  # (epoch, iteration, loss) of each rank-0 loss line, in file order
    for line in lines:
        loss, rank = _LOSS.search(line), _RANK.search(line)
        if not loss or (rank and int(rank[1]) != 0):
            continue
        epoch, iteration = _EPOCH.search(line), _ITERATION.search(line)
        rows.append((epoch and int(epoch[1]), iteration and int(iteration[1]), float(loss[1])))

    numbered = [row for row in rows if row[1] is not None]
    if not numbered:
        return {step: loss for step, (_, _, loss) in enumerate(rows, start=1)}
    restarts = any(it2 < it1 and None not in (ep1, ep2) and ep2 != ep1
                   for (ep1, it1, _), (ep2, it2, _) in zip(numbered, numbered[1:]))
    if restarts:
        return {step: loss for step, (_, _, loss) in enumerate(numbered, start=1)}
    offset = 1 if min(iteration for _, iteration, _ in numbered) == 0 else 0
    return {iteration + offset: loss for _, iteration, loss in numbered}


def compare(run: dict[int, float], ref: dict[int, float], skip: int = 50, signed: bool = False) -> dict:
    """Mean relative and absolute error of run against ref over their common steps > skip."""
    steps = sorted(step for step in run.keys() & ref.keys() if step > skip)
    if not steps:
        raise ValueError(f"the logs have no common steps after skipping steps <= {skip}")
    diffs = [run[s] - ref[s] for s in steps]
    if not signed:
        diffs = [abs(d) for d in diffs]
    relative = [_relative(d, ref[s]) for d, s in zip(diffs, steps)]
    return {
        "steps": len(steps),
        "mean_relative_error": sum(relative) / len(steps),
        "mean_absolute_error": sum(diffs) / len(steps),
    }


def _relative(diff: float, ref: float) -> float:
    if ref:
        return diff / abs(ref)
    return math.copysign(math.inf, diff) if diff else 0.0


def plot(run: dict[int, float], ref: dict[int, float], skip: int, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for losses, label in ((ref, "reference"), (run, "run")):
        steps = sorted(losses)
        ax.plot(steps, [losses[s] for s in steps], label=label, linewidth=1)
    first = min(min(run), min(ref))
    if skip >= first:
        ax.axvspan(first, skip, color="grey", alpha=0.2, label=f"skipped (step <= {skip})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare a run's per-step loss with a reference run's.")
    parser.add_argument("run_log", help="the run's steps.jsonl or text log")
    parser.add_argument("reference_log", help="the reference's steps.jsonl or text log")
    parser.add_argument("--skip", type=int, default=50, help="drop steps <= SKIP (default 50)")
    parser.add_argument("--plot", metavar="PNG", help="write both loss curves to this PNG file")
    parser.add_argument("--max-rel", type=float, default=0.05, help="pass if mean relative error <= this")
    parser.add_argument("--max-abs", type=float, default=0.0002, help="pass if mean absolute error <= this")
    parser.add_argument("--signed", action="store_true", help="average run - ref instead of |run - ref|")
    args = parser.parse_args(argv)

    try:
        run, ref = read_log(args.run_log), read_log(args.reference_log)
        result = compare(run, ref, args.skip, args.signed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rel, abs_ = result["mean_relative_error"], result["mean_absolute_error"]
    result["passed"] = abs(rel) <= args.max_rel or abs(abs_) <= args.max_abs
    verdict = "PASS" if result["passed"] else "FAIL"
    kind = "signed " if args.signed else ""
    print(f"compared steps:      {result['steps']} (steps <= {args.skip} skipped)")
    print(f"{kind}mean relative error: {rel:.6g} (max {args.max_rel:g})")
    print(f"{kind}mean absolute error: {abs_:.6g} (max {args.max_abs:g})")
    print(verdict)
    if args.plot:
        plot(run, ref, args.skip, args.plot, f"{verdict}: mean relative error {rel:.4g}, "
                                             f"mean absolute error {abs_:.4g}")
    print(json.dumps(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
