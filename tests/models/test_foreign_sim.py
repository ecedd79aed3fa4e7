import cv2
import numpy as np
import pytest
from scipy import ndimage

from anomalygpt_edge.models import spec
from anomalygpt_edge.models.anomaly_sim import answer_for, object_mask
from anomalygpt_edge.models.foreign_sim import CONTENTS, ForeignParams, blob_mask, simulate_foreign
from anomalygpt_edge.models.synthetic import CATEGORIES, normal_image

NAMES = sorted(CATEGORIES)


def _pair(i):
    return normal_image(NAMES[i % 5], i), normal_image(NAMES[(i + 2) % 5], 700 + i)


def test_blob_mask_is_one_or_two_blobs_inside_the_region():
    region = np.zeros((224, 224), np.uint8)
    region[40:180, 60:200] = 1
    counts = set()
    for seed in range(20):
        m = blob_mask(np.random.default_rng(seed), (224, 224), ForeignParams(), region)
        n, _ = cv2.connectedComponents(m, connectivity=8)
        counts.add(n - 1)
        assert not m[region == 0].any()
        assert 0 < m.sum() <= 0.06 * region.sum() + 1
    assert counts == {1, 2}


@pytest.mark.parametrize('content', CONTENTS)
def test_only_the_blob_changes_and_the_answer_names_the_labelled_regions(content):
    found = 0
    for i in range(6):
        dest, other = _pair(i)
        res = simulate_foreign(dest, other, NAMES[i % 5], i, content=content)
        diff = np.abs(dest.astype(np.float32) - res.image).max(-1)
        if res.positions:
            found += 1
            n, labels, stats, centroids = cv2.connectedComponentsWithStats(res.binary_mask, connectivity=8)
            assert n - 1 == len(res.positions) <= 2
            want = sorted((c[1] / 224, c[0] / 224) for c in centroids[1:])
            assert [spec.position_word(r, c) for r, c in want] == res.positions
            assert res.answer == answer_for(res.positions)
            assert (diff[res.binary_mask > 0] > 1).mean() > 0.9   # the label marks visible change
        else:
            assert res.answer == spec.ANSWER_NORMAL and not res.binary_mask.any()
        assert ((res.mask > 0) <= (res.binary_mask > 0)).all()   # small specks are dropped from the label too
    # blurring a smooth surface (brushed metal, the washer) changes too little to be labelled, by design
    assert found >= (2 if content == 'blur' else 5), f"{content}: too few visible anomalies"


def test_changes_stay_near_the_blob():
    for i in range(8):
        dest, other = _pair(i)
        rng = np.random.default_rng(i)
        res = simulate_foreign(dest, other, NAMES[i % 5], rng)
        # re-draw the same blob to know where the change was allowed
        rng2 = np.random.default_rng(i)
        p = ForeignParams()
        bg = CATEGORIES[NAMES[i % 5]].background
        region = cv2.erode(object_mask(dest, bg), np.ones((9, 9), np.uint8)) if bg else None
        blob = blob_mask(rng2, dest.shape[:2], p, region)
        diff = np.abs(dest.astype(np.int16) - res.image).max(-1)
        assert diff[~ndimage.binary_dilation(blob, iterations=4)].max() <= 1
        if region is not None:
            assert not blob[region == 0].any()   # objects: the anomaly lies on the part


def test_deterministic_and_bad_input():
    dest, other = _pair(1)
    a = simulate_foreign(dest, other, NAMES[1], 5)
    b = simulate_foreign(dest, other, NAMES[1], 5)
    assert np.array_equal(a.image, b.image) and a.answer == b.answer
    with pytest.raises(ValueError, match='uint8'):
        simulate_foreign(dest, other[:100], NAMES[1], 5)
    with pytest.raises(ValueError, match='unknown foreign content'):
        simulate_foreign(dest, other, NAMES[1], 5, content='paint')
