"""Pretrain an MAE on a Ray cluster (or a local one started on the spot).

    python pipelines/pretrain.py --config configs/demo.yaml [section.key=value ...]
    ray job submit --working-dir . -- python pipelines/pretrain.py --config configs/mae_vit_large.yaml \\
        scaling.num_workers=64 data.path=/datasets/imagenet run.storage_path=s3://bucket/runs

Running again with the same run.name and run.storage_path continues from the run's latest
checkpoint; raising train.epochs extends a finished run. Before any work starts, the config,
the data, the storage and the cluster's resources are checked, each failure one line, and
the run directory's lease is taken (cluster/lease.py): while another driver of the same run
is alive, this one stops at once, naming it.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from pipelines.driver.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(task="pretrain", doc=__doc__))
