"""The best validation accuracy of classification runs (pipelines/finetune.py, linprobe.py),
side by side: what `make demo` prints after its fine-tunes and linear probe.

    python pipelines/results.py runs/demo_finetune runs/demo_finetune_random_init runs/demo_linprobe

Each argument is a run directory (local or s3://) holding metrics.jsonl. A table, one row
per run: its task, where its weights started, its best top-1 and top-5 and at which epoch;
then where each run's loss curve is. `--json`: the same rows as one JSON list instead. Exit
status 2 when a run has no evaluated epoch.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from cluster.storage import open_storage  # noqa: E402
from pipelines.common.checkpoints import add_s3_options  # noqa: E402
from pipelines.output.run_files import best_epoch, read_jsonl  # noqa: E402


def best_of(run_dir: str, s3_endpoint: str | None = None, s3_region: str | None = None,
            s3_credentials_file: str | None = None) -> dict | None:
    """{run, task, start, epochs, best_epoch, val_top1, val_top5} of a run (a local path or
    s3://), or None when no epoch of it was evaluated."""
    storage = open_storage(run_dir, s3_endpoint, s3_region, s3_credentials_file)
    evaluated = [m for m in read_jsonl(storage, "metrics.jsonl") if "val_top1" in m]
    best = best_epoch(evaluated)
    if best is None:
        return None
    import yaml
    config = yaml.safe_load(storage.read("config.yaml") or b"{}") or {}
    return {"run": run_dir, "task": config.get("train", {}).get("task"),
            "start": config.get("model", {}).get("checkpoint") or "random init", "epochs": len(evaluated),
            "best_epoch": best["epoch"], "val_top1": best["val_top1"], "val_top5": best["val_top5"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories of pipelines/finetune.py or linprobe.py (local or s3://)")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON list instead of a table")
    add_s3_options(ap, "the run directories")
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        try:
            row = best_of(run, args.s3_endpoint, args.s3_region, args.s3_credentials_file)
        except (OSError, ValueError) as e:  # unreadable (S3), or a credentials file refused
            print(f"error: {run}: {e}", file=sys.stderr)
            return 2
        if row is None:
            print(f"error: {run} has no evaluated epoch (metrics.jsonl without val_top1)", file=sys.stderr)
            return 2
        rows.append(row)
    if args.json:
        print(json.dumps(rows))
    else:
        print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    """The rows as a table for a person, then where each run's loss curve is."""
    head = ["run", "task", "start", "best top-1", "top-5", "best epoch"]
    body = [[r["run"], r["task"] or "?", r["start"], f"{r['val_top1']:.2f}%", f"{r['val_top5']:.2f}%",
             f"{r['best_epoch']} of {r['epochs']}"] for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    right = {3, 4}  # the figures, aligned on their decimal point

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                         enumerate(zip(cells, widths))).rstrip()

    curves = [f"  {r['run'].rstrip('/')}/loss_curve.png" for r in rows]
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body), "",
                      "Training loss and validation accuracy per epoch, as plots:", *curves])


if __name__ == "__main__":
    sys.exit(main())
