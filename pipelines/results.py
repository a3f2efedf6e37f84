"""The best validation accuracy of classification runs (pipelines/finetune.py, linprobe.py),
side by side: what `make demo` prints after its fine-tunes and linear probe.

    python pipelines/results.py runs/demo_finetune runs/demo_finetune_random_init runs/demo_linprobe

Each argument is a run directory (local or s3://) holding metrics.jsonl. One line per run:
its task, where its weights started, its best top-1 and top-5 and at which epoch. The last
line is a JSON list of the same. Exit status 2 when a run has no evaluated epoch.
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
    width = max(len(r["run"]) for r in rows)
    for r in rows:
        print(f"{r['run']:<{width}}  {r['task']:<8}  from {r['start']:<24}  best top-1 {r['val_top1']:6.2f}%  "
              f"top-5 {r['val_top5']:6.2f}%  (epoch {r['best_epoch']} of {r['epochs']})")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
