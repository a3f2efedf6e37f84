import numpy as np
import pyarrow.fs as pafs

from pipelines.data.reading import class_of, list_imagefolder
from pipelines.data.stream import decode_batch


def test_listing_labels_follow_sorted_class_folders(digits):
    folder = list_imagefolder(pafs.LocalFileSystem(), str(digits))
    assert folder.classes == [str(d) for d in range(10)]
    assert len(folder) == 1797 - int(1797 * 0.2)
    for path, label in zip(folder.paths[::97], folder.labels[::97]):
        assert path.split("/")[-2] == class_of(path) == folder.classes[label]


def test_decode_step_draws_fresh_crops_each_call(digits):
    folder = list_imagefolder(pafs.LocalFileSystem(), str(digits))
    data = open(folder.paths[0], "rb").read()
    a = decode_batch([data] * 8, [0] * 8, ["x"] * 8, 16)["image"]
    b = decode_batch([data] * 8, [0] * 8, ["x"] * 8, 16)["image"]
    assert a.shape == (8, 16, 16, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, b)


def test_a_decoder_without_the_region_module_says_so_once(monkeypatch, caplog):
    import logging

    from mae import transforms
    from pipelines.data import stream
    monkeypatch.setattr(transforms, "REGION_DECODE", False)  # as on a node where setup.py found no libjpeg headers
    monkeypatch.setattr(stream, "_warned_whole_image", False)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            stream.warn_whole_image_decode()
    assert caplog.text.count("mae_jpeg_region is not built on") == 1


def test_an_imagefolder_listing_is_held_compactly_in_class_then_name_order(tmp_path):
    """The driver holds an ImageFolder's paths as `Paths` (one buffer, offsets, folder
    indices), not an object per file: ImageNet-style names cost under 40 bytes each, so
    12.8 M images list in about 0.5 GB (a tuple of str took 5.4 GB). Only `<class>/<image>`
    files with an image extension are listed, classes and names sorted."""
    import numpy as np
    from pipelines.data.reading import Paths
    for c, names in {"n2": ["b.JPEG", "a.png", "notes.txt"], "n1": ["z.jpg"], "empty": []}.items():
        (tmp_path / "train" / c).mkdir(parents=True)
        for n in names:
            (tmp_path / "train" / c / n).write_bytes(b"x")
    (tmp_path / "train" / "n1" / "deeper").mkdir()
    (tmp_path / "train" / "n1" / "deeper" / "x.jpg").write_bytes(b"x")
    (tmp_path / "train" / "top.jpg").write_bytes(b"x")
    folder = list_imagefolder(pafs.LocalFileSystem(), str(tmp_path))
    top = f"{tmp_path}/train"
    assert list(folder.paths) == [f"{top}/n1/z.jpg", f"{top}/n2/a.png", f"{top}/n2/b.JPEG"]
    assert folder.classes == ["n1", "n2"] and folder.labels.tolist() == [0, 1, 1] and folder.labels.dtype == np.int32

    classes = [f"/data/imagenet/train/n{k:08d}" for k in range(1000)]
    names = [[f"n{k:08d}_{i}.JPEG" for i in range(1000)] for k in range(1000)]  # 1 M files
    paths = Paths(classes, names)
    assert len(paths) == 10**6 and paths[123_456] == f"{classes[123]}/{names[123][456]}"
    assert paths.nbytes() / len(paths) < 40
