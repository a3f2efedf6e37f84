"""What a run leaves next to Ray's checkpoints: config.yaml, metrics.jsonl (one object per
epoch), steps.jsonl (one per optimizer step), attempts.jsonl (one per start of the
worker group), loss_curve.png and reconstructions/.

Files are rewritten whole and atomically, on any storage (cluster.storage). The metrics
files and figures are written by pipelines/output/metrics.py, with the run's other sinks.
"""
import json
import time

from cluster.storage import Storage


def read_jsonl(storage: Storage, name: str) -> list[dict]:
    data = storage.read(name)
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()] if data else []


def write_jsonl(storage: Storage, name: str, records: list[dict]) -> None:
    """The whole file, one JSON object per line (atomically, as every Storage write)."""
    storage.write(name, "".join(json.dumps(r) + "\n" for r in records))


def end_attempt(storage: Storage, error: str, job_id: str) -> None:
    """Record that the latest start of the worker group (of Ray job `job_id`) ended on
    `error`, one that a restart would meet again (the driver reports it and exits 1). A start
    that failed before it was recorded gets a line of its own."""
    attempts = read_jsonl(storage, "attempts.jsonl")
    if not attempts or attempts[-1].get("job_id") != job_id:
        attempts.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "job_id": job_id})
    attempts[-1]["error"] = error
    write_jsonl(storage, "attempts.jsonl", attempts)


def ended_by(storage: Storage, job_id: str) -> str | None:
    """The error that ended Ray job `job_id`'s run of this directory, if one did (a restart
    after it stops at once: see pipelines/worker/loop.py: train_loop_per_worker)."""
    attempts = read_jsonl(storage, "attempts.jsonl")
    last = attempts[-1] if attempts else {}
    return last.get("error") if last.get("job_id") == job_id else None


def record_attempt(storage: Storage, attempt: dict) -> None:
    """One line in attempts.jsonl per start of the worker group (the first start, each
    resubmission, each restart after a failure): where it started from and where each
    worker ran. The file is a history, never truncated."""
    attempt = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **attempt}
    write_jsonl(storage, "attempts.jsonl", read_jsonl(storage, "attempts.jsonl") + [attempt])


def best_epoch(metrics: list[dict]) -> dict | None:
    """The epoch record with the highest validation top-1 (the first of equals), or None when
    no epoch was evaluated: the one rule for the worker's best checkpoint, the driver's last
    line and results.py."""
    return max((m for m in metrics if "val_top1" in m), key=lambda m: m["val_top1"], default=None)


def plot_loss_curve(steps: list[dict], metrics: list[dict]) -> bytes:
    """PNG: per-step loss (raw and smoothed) and per-epoch loss, lr on a second axis; below
    them, for a classification run, validation top-1 and top-5 per epoch."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    evaluated = [m for m in metrics if "val_top1" in m]
    if evaluated:
        fig, (ax, acc_ax) = plt.subplots(2, 1, figsize=(8, 7), dpi=100, sharex=True, height_ratios=(3, 2))
        x = [m["epoch"] + 1 for m in evaluated]
        acc_ax.plot(x, [m["val_top1"] for m in evaluated], "o-", color="tab:red", ms=3, label="val top-1")
        acc_ax.plot(x, [m["val_top5"] for m in evaluated], "s--", color="tab:purple", ms=3, label="val top-5")
        acc_ax.set_ylabel("accuracy (%)")
        acc_ax.set_xlabel("epoch")
        acc_ax.legend(loc="lower right", fontsize=8)
        acc_ax.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if steps:
        x = np.array([s["epoch"] for s in steps])
        loss = np.array([s["loss"] for s in steps])
        ax.plot(x, loss, color="tab:blue", alpha=0.25, lw=0.8, label="loss per step")
        k = max(1, min(len(loss) // 20, 50))
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1:], smooth, color="tab:blue", lw=1.5, label=f"loss, mean of {k} steps")
        lr_ax = ax.twinx()
        lr_ax.plot(x, [s["lr"] for s in steps], color="tab:orange", lw=1, label="lr")
        lr_ax.set_ylabel("learning rate", color="tab:orange")
    if metrics:
        ax.plot([m["epoch"] + 1 for m in metrics], [m["train_loss"] for m in metrics], "o-",
                color="tab:green", ms=3, label="loss per epoch (at epoch end)")
    if not evaluated:
        ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
