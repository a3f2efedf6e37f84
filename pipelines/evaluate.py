"""Did pretraining learn? Linear probe and k-NN on frozen encoder features.

    python pipelines/evaluate.py --checkpoint runs/demo --data data/digits [--random-init] [--compare-random-init]

--checkpoint is a checkpoint.pth (ours or official, encoder-only ones included) or a run
directory (its latest checkpoint), local or on S3 (s3://bucket/prefix, with --s3-endpoint for
MinIO or Ceph, --s3-credentials-file or the usual AWS environment for the keys; the feature
actors read it with the same settings). Ray Data decodes the images of <data>/train and
<data>/val (resize + centre crop) and runs the frozen encoder over them, unmasked; the
feature of an image is its cls token next to its mean-pooled patch tokens (after the final
norm). Features are standardised with the train set's mean and std, then:
  - linear probe: multinomial logistic regression fitted on train (scikit-learn, L-BFGS);
  - k-NN: k=20 nearest train features by cosine similarity, votes weighted by similarity.
Top-1 accuracy on val of both is printed, and as the last line JSON. --random-init uses a
freshly initialised encoder of the same shape instead of the checkpoint's weights;
--compare-random-init evaluates both and prints both pairs.
"""
import argparse
import json
import os
import sys

import numpy as np
import pyarrow.fs as pafs
import ray
import torch

from mae.checkpoint import model_from_checkpoint
from mae.model import MaskedAutoencoderViT, create_model
from mae.transforms import eval_crops, normalize_on_device
from pipelines.common.checkpoints import add_checkpoint_options, locate_checkpoint, read_checkpoint
from pipelines.data.reading import ImageFolder, class_of, list_imagefolder


def local_imagefolder(root: str, split: str) -> ImageFolder:
    return list_imagefolder(pafs.LocalFileSystem(), os.path.abspath(root), split)


@torch.no_grad()
def encoder_features(model: MaskedAutoencoderViT, imgs: torch.Tensor) -> torch.Tensor:
    """Unmasked encoder output -> [N, 2D]: cls token, mean of the patch tokens."""
    n, length = imgs.shape[0], model.patch_embed.num_patches
    identity_order = torch.arange(length, dtype=torch.float32).expand(n, length)
    latent, _, _ = model.forward_encoder(imgs, mask_ratio=0.0, noise=identity_order)  # [N, 1 + L, D]
    return torch.cat([latent[:, 0], latent[:, 1:].mean(dim=1)], dim=1)


class Features:
    """Ray Data actor: decode + resize/crop + encoder forward, for one batch of files."""

    def __init__(self, checkpoint: str, s3: dict, random_init: bool, classes: list[str], threads: int = 1):
        torch.set_num_threads(threads)
        self.model = load_encoder(checkpoint, s3, random_init).eval()
        self.size = self.model.patch_embed.img_size[0]
        self.class_index = {c: i for i, c in enumerate(classes)}

    def __call__(self, batch: dict) -> dict:
        feats = encoder_features(self.model, normalize_on_device(eval_crops(batch["bytes"], self.size),
                                                                 torch.device("cpu")))
        labels = [self.class_index[class_of(p)] for p in batch["path"]]
        return {"features": feats.numpy(), "label": np.array(labels, dtype=np.int64), "path": batch["path"]}


def load_encoder(checkpoint: str, s3: dict, random_init: bool) -> MaskedAutoencoderViT:
    """The encoder of the checkpoint file `checkpoint`; `s3`: `read_checkpoint`'s endpoint, region
    and credentials_file (a credentials file's path goes to the actors, never the keys in it)."""
    model, name = model_from_checkpoint(read_checkpoint(checkpoint, **s3), require_decoder=False)
    if random_init:
        torch.manual_seed(0)
        model = create_model(name, img_size=model.patch_embed.img_size[0])
    return model


def extract(folders: list[ImageFolder], checkpoint: str, s3: dict, random_init: bool,
            batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Features and labels of each folder's images, in one pass over all of them: one pool of
    feature actors (each loads the encoder once), as many as there are batches to run, at most
    the cluster's CPUs but one."""
    paths = [list(folder.paths) for folder in folders]
    owner = {path: i for i, group in enumerate(paths) for path in group}
    total = sum(map(len, paths))
    workers = max(1, min(int(ray.cluster_resources().get("CPU", 1)) - 1, -(-total // batch_size)))
    ds = ray.data.read_binary_files([p for group in paths for p in group], include_paths=True)
    ds = ds.map_batches(Features, fn_constructor_kwargs=dict(checkpoint=checkpoint, s3=s3, random_init=random_init,
                                                            classes=sorted(set().union(*(f.classes for f in folders)))),
                        batch_size=batch_size, batch_format="numpy", num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(size=workers))
    rows = [[] for _ in folders]
    for row in ds.take_all():
        rows[owner[row["path"]]].append(row)
    return [(np.stack([r["features"] for r in group]), np.array([r["label"] for r in group])) for group in rows]


def linear_probe(train_x, train_y, val_x, val_y) -> float:
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(train_x, train_y)
    return float((clf.predict(val_x) == val_y).mean())


def knn(train_x, train_y, val_x, val_y, k: int = 20, num_classes: int | None = None) -> float:
    train = torch.nn.functional.normalize(torch.from_numpy(train_x).float(), dim=1)
    val = torch.nn.functional.normalize(torch.from_numpy(val_x).float(), dim=1)
    labels = torch.from_numpy(train_y)
    num_classes = num_classes or int(labels.max()) + 1
    correct = 0
    for chunk, truth in zip(val.split(1024), torch.from_numpy(val_y).split(1024)):
        sim, idx = (chunk @ train.T).topk(min(k, len(train)), dim=1)  # [B, k]
        votes = torch.zeros(len(chunk), num_classes).scatter_add_(1, labels[idx], sim)
        correct += int((votes.argmax(1) == truth).sum())
    return correct / len(val)


def evaluate(checkpoint: str, s3: dict, data: str, random_init: bool, k: int, batch_size: int) -> dict:
    train, val = local_imagefolder(data, "train"), local_imagefolder(data, "val")
    (train_x, train_y), (val_x, val_y) = extract([train, val], checkpoint, s3, random_init, batch_size)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    return {"random_init": random_init, "linear_top1": linear_probe(train_x, train_y, val_x, val_y),
            "knn_top1": knn(train_x, train_y, val_x, val_y, k, len(train.classes)),
            "feature_dim": int(train_x.shape[1]), "train_images": len(train_y), "val_images": len(val_y)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_options(ap, "checkpoint.pth or a run directory")
    ap.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    ap.add_argument("--random-init", action="store_true", help="an untrained encoder of the same shape")
    ap.add_argument("--compare-random-init", action="store_true", help="evaluate both the checkpoint and random init")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args(argv)
    s3 = dict(endpoint=args.s3_endpoint, region=args.s3_region, credentials_file=args.s3_credentials_file)
    try:
        store, name = locate_checkpoint(args.checkpoint, **s3)
        checkpoint = store.child(name).uri  # the file itself: each actor reads it, no run directory to list again
        local_imagefolder(args.data, "train"), local_imagefolder(args.data, "val")
    except (ValueError, OSError) as e:  # missing, unreadable (S3), a credentials file refused, no images
        print(f"error: {e}", file=sys.stderr)
        return 2
    ray.init(ignore_reinit_error=True, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    variants = [False, True] if args.compare_random_init else [args.random_init]
    results = [evaluate(checkpoint, s3, args.data, random_init, args.k, args.batch_size) for random_init in variants]
    print(f"checkpoint {checkpoint}, data {args.data}")
    for r in results:
        print(f"  {'random-init encoder' if r['random_init'] else 'pretrained encoder ':<19}  "
              f"linear probe top-1 {100 * r['linear_top1']:5.1f}%   k-NN (k={args.k}) top-1 {100 * r['knn_top1']:5.1f}%")
    print(json.dumps(results[0] if len(results) == 1 else {"pretrained": results[0], "random_init": results[1]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
