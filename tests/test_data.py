import shutil

import numpy as np

from pipelines.data import DecodeCrop, imagefolder_stream, list_imagefolder


def test_listing_labels_follow_sorted_class_folders(digits):
    folder = list_imagefolder(str(digits))
    assert folder.classes == [str(d) for d in range(10)]
    assert len(folder) == 1797 - int(1797 * 0.2)
    for path, label in zip(folder.paths[::97], folder.labels[::97]):
        assert path.split("/")[-2] == folder.classes[label]


def test_decode_step_draws_fresh_crops_each_call(digits):
    folder = list_imagefolder(str(digits))
    data = open(folder.paths[0], "rb").read()
    step = DecodeCrop(16, {c: i for i, c in enumerate(folder.classes)})
    batch = {"bytes": [data] * 8, "path": [folder.paths[0]] * 8}
    a, b = step(batch)["image"], step(batch)["image"]
    assert a.shape == (8, 16, 16, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, b)


def test_stream_yields_uint8_crops_of_every_image_and_skips_bad_files(ray_client, digits, tmp_path):
    root = tmp_path / "imgs"
    shutil.copytree(digits / "train" / "3", root / "train" / "3")
    shutil.copytree(digits / "train" / "7", root / "train" / "7")
    (root / "train" / "7" / "broken.JPEG").write_bytes(b"\xff\xd8\xff truncated")
    folder = list_imagefolder(str(root))
    ds = imagefolder_stream(folder, input_size=32, seed=0, decode_batch_size=16)
    rows = 0
    for batch in ds.iter_batches(batch_size=50, batch_format="numpy"):
        assert batch["image"].dtype == np.uint8 and batch["image"].shape[1:] == (32, 32, 3)
        assert set(batch["label"]) <= {0, 1}
        rows += len(batch["image"])
    assert rows == len(folder) - 1
