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
