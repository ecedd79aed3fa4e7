"""The calibration reader feeds exactly what the runtime would: same preprocessing, seeded order, caps."""
import cv2
import numpy as np
import pytest

from anomalygpt_edge.calibration.data_reader import CalibrationError, ImageBatches, list_images, ort_reader
from anomalygpt_edge.runtime.bundle import Bundle
from anomalygpt_edge.runtime.pipeline import Pipeline


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp('normals')
    rng = np.random.default_rng(0)
    for i in range(7):  # odd sizes and aspect ratios: the resize path matters
        h, w = int(rng.integers(180, 400)), int(rng.integers(180, 400))
        img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 3)
        cv2.imwrite(str(d / f'{i:02d}.png' if i % 2 else d / f'{i:02d}.jpg'), img)
    (d / 'notes.txt').write_text('not an image')
    return d


@pytest.fixture(scope='module')
def pipeline(tiny_bundle):
    with Pipeline.from_bundle(tiny_bundle, llm=False) as p:
        yield p


def test_batches_equal_the_runtime_preprocessing(folder, pipeline):
    paths = list_images(folder)
    assert len(paths) == 7 and all(p.suffix in ('.png', '.jpg') for p in paths)
    batches = ImageBatches(paths, pipeline.bundle.manifest['preprocess'], batch_size=3, shuffle=True, seed=5)
    got = list(batches)
    assert [b.shape for b in got] == [(3, 3, 224, 224), (3, 3, 224, 224), (1, 3, 224, 224)]
    order = [p for chunk in batches.batch_paths() for p in chunk]
    assert sorted(order) == paths and order != paths
    want = np.concatenate([pipeline.load(p)[0] for p in order])
    np.testing.assert_array_equal(np.concatenate(got), want)   # bit-identical, not merely close
    assert got[0].dtype == np.float32 and got[0].flags['C_CONTIGUOUS']


def test_resize_mode_follows_the_bundle_or_the_caller(folder, pipeline):
    cfg = pipeline.bundle.manifest['preprocess']
    p = list_images(folder)[0]
    np.testing.assert_array_equal(ImageBatches([p], cfg).load(p), pipeline.load(p)[0])
    np.testing.assert_array_equal(ImageBatches([p], cfg, resize_mode='center_crop').load(p),
                                  pipeline.load(p, 'center_crop')[0])


def test_seeded_shuffle_cap_and_drop_last(folder, tiny_bundle):
    b = Bundle.open(tiny_bundle)
    a = ImageBatches.from_folder(folder, b, batch_size=2, seed=1)
    assert a.paths == ImageBatches.from_folder(folder, b, batch_size=2, seed=1).paths
    assert a.paths != ImageBatches.from_folder(folder, b, batch_size=2, seed=2).paths
    assert ImageBatches.from_folder(folder, b, shuffle=False).paths == list_images(folder)
    capped = ImageBatches.from_folder(folder, b, batch_size=2, seed=1, max_images=5)
    assert capped.paths == a.paths[:5] and len(capped) == 3
    dropped = ImageBatches.from_folder(folder, b, batch_size=2, seed=1, max_images=5, drop_last=True)
    assert len(dropped) == 2 and [x.shape[0] for x in dropped] == [2, 2]


def test_onnxruntime_reader_rewinds_to_the_same_data(folder, tiny_bundle):
    batches = ImageBatches.from_folder(folder, Bundle.open(tiny_bundle), batch_size=4, seed=0)
    reader = ort_reader(batches, 'image')
    first = []
    while (feeds := reader.get_next()) is not None:
        first.append(feeds['image'])
    reader.rewind()
    second = [reader.get_next()['image'] for _ in range(len(first))]
    assert reader.get_next() is None and len(first) == 2
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)


def test_errors_name_the_folder(tmp_path, tiny_bundle):
    with pytest.raises(CalibrationError, match=str(tmp_path / 'missing')):
        list_images(tmp_path / 'missing')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(CalibrationError, match='no images'):
        ImageBatches.from_folder(tmp_path / 'empty', Bundle.open(tiny_bundle))
    (tmp_path / 'normal.png').write_bytes(b'')
    with pytest.raises(CalibrationError) as e:
        list_images(tmp_path / 'normal.png')
    assert str(e.value) == f"{tmp_path / 'normal.png'}: a file, not a folder of images"
