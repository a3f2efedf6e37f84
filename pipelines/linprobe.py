"""Linear probing of a pretrained MAE's encoder on a Ray cluster, as the paper's
`main_linprobe.py` (configs/linprobe_vit_{base,large,huge}.yaml): the encoder frozen, its
class token through a BatchNorm without affine parameters into a linear head, LARS, blr 0.1
at an effective batch of 16384, 10 warmup epochs then cosine, no weight decay.

    python pipelines/linprobe.py --config configs/linprobe_demo.yaml model.checkpoint=runs/demo
    ray job submit --working-dir . -- python pipelines/linprobe.py --config configs/linprobe_vit_base.yaml \\
        model.checkpoint=/shared/mae_runs/mae_vit_base_patch16-800ep data.path=/datasets/imagenet

Evaluation each epoch, the best checkpoint, resume and everything else: as pipelines/finetune.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from pipelines.driver.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(task="linprobe", doc=__doc__))
