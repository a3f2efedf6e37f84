"""Fine-tune a pretrained MAE's encoder as an image classifier on a Ray cluster, with the
paper's recipe (configs/finetune_vit_{base,large,huge}.yaml): timm's VisionTransformer with
global average pooling and fc_norm, AdamW with layer-wise lr decay, drop path, RandAugment,
random erasing, Mixup / CutMix with label smoothing, warmup then cosine.

    python pipelines/finetune.py --config configs/finetune_demo.yaml model.checkpoint=runs/demo
    ray job submit --working-dir . -- python pipelines/finetune.py --config configs/finetune_vit_base.yaml \\
        model.checkpoint=s3://bucket/runs/mae_vit_base_patch16-800ep data.path=/datasets/imagenet \\
        run.storage_path=s3://bucket/runs

model.checkpoint: a run directory of ours (its latest checkpoint), a checkpoint file of ours
or an official .pth (mae_pretrain_vit_base.pth); null starts from random weights. After every
epoch the validation images (imagefolder `val/`, or data.val_path's shards) are evaluated
(as the official code: resize to int(input_size / 0.875) up to 224 px, to input_size
above, bicubic, centre crop): val_top1 / val_top5 in metrics.jsonl,
the best epoch's checkpoint kept as best/checkpoint.pth. Everything else is as
pipelines/pretrain.py: resume by submitting again, restarts after a worker loss, mid-epoch
checkpoints, S3, preflight, the accelerators table, bf16/fp16.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from pipelines.driver.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(task="finetune", doc=__doc__))
