import cv2
import numpy as np
import pytest
from scipy import ndimage

from anomalygpt_edge.models import spec
from anomalygpt_edge.models.anomaly_sim import (SIM_PARAMS, ForcedPatch, SimParams, _label_centroid, answer_for,
                                                 logistic_label, object_mask, simulate)
from anomalygpt_edge.models.synthetic import CATEGORIES, normal_image

NAMES = sorted(CATEGORIES)


def _pair(i):
    return normal_image(NAMES[i % 5], i), normal_image(NAMES[(3 * i + 1) % 5], 500 + i)


def test_label_covers_exactly_the_changed_region():
    changed = covered = labelled_changed = labelled = 0
    for i in range(10):
        dest, src = _pair(i)
        res = simulate(dest, src, NAMES[i % 5], i)
        assert res.rects, 'one patch is always attempted and should fit on these images'
        diff = np.abs(dest.astype(np.float32) - res.image).mean(-1)
        in_rects = np.zeros(diff.shape, bool)
        for r0, r1, c0, c1 in res.rects:
            in_rects[r0:r1, c0:c1] = True
        assert diff[~in_rects].max() == 0          # Poisson blending leaves everything else untouched
        assert not (res.mask[~ndimage.binary_dilation(in_rects, iterations=2)] > 0).any()
        assert (res.binary_mask <= (res.mask > 0)).all()
        assert 0 <= res.mask.min() and res.mask.max() <= 1
        changed += (diff > 1).sum()
        covered += ((diff > 1) & (res.mask > 0)).sum()
        labelled += (res.binary_mask > 0).sum()
        labelled_changed += ((res.binary_mask > 0) & (diff > 1)).sum()
    assert covered / changed > 0.9           # the label finds the change (median blur trims specks)
    assert labelled_changed / labelled > 0.9  # and the binarised label is change, not noise


@pytest.mark.parametrize('bounds', [((0.1, 0.2), (0.05, 0.1)), ((0.1, 0.2), (0.03, 0.04))])
def test_patch_sizes_respect_the_width_bounds(bounds):
    # the reference keeps the whole resized patch within the half-width bounds, on each axis
    params = SimParams(width_bounds=bounds)
    (a1, b1), (a2, b2) = bounds
    lo1, hi1, lo2, hi2 = round(a1 * 224), round(b1 * 224), round(a2 * 224), round(b2 * 224)
    heights, widths = [], []
    for i in range(30):
        dest, src = _pair(i)
        for r0, r1, c0, c1 in simulate(dest, src, NAMES[i % 5], i, params=params).rects:
            heights.append(r1 - r0)
            widths.append(c1 - c0)
    assert len(heights) > 10
    assert all(lo1 <= h <= hi1 for h in heights) and all(lo2 <= w <= hi2 for w in widths)
    assert len(set(heights)) > 3   # sizes are random, not stuck at a bound


def test_second_patch_is_a_coin_flip():
    params = SimParams(width_bounds=((0.03, 0.06), (0.03, 0.06)))
    dest, src = _pair(0)
    counts = [len(simulate(dest, src, 'woven_fabric', s, params=params).rects) for s in range(80)]
    assert set(counts) <= {1, 2} and 0.3 < counts.count(2) / len(counts) < 0.7


def _forced(*centres, half=12):
    return [ForcedPatch(dest_centre=c, src_centre=(112, 112), half_widths=(half, half), scale=1.0) for c in centres]


def test_one_patch_at_a_known_place():
    dest, src = normal_image('ceramic_tiles', 1), normal_image('wood_grain', 2)
    res = simulate(dest, src, 'ceramic_tiles', 0, forced=_forced((40, 180)))
    assert res.rects == [(28, 52, 168, 192)]
    assert res.positions == ['top right']
    assert res.answer == spec.ANSWER_ONE.format('top right')
    assert res.question == spec.SYNTHETIC_DESCRIPTIONS['ceramic_tiles'] + ' ' + spec.QUESTION
    rows, cols = np.nonzero(res.binary_mask)
    assert abs(rows.mean() - 40) < 3 and abs(cols.mean() - 180) < 3


def test_cumulative_box_quirk_versus_own_centres():
    dest, src = normal_image('woven_fabric', 1), normal_image('washer', 2)
    forced = _forced((40, 40), (180, 180))
    quirk = simulate(dest, src, 'woven_fabric', 0, forced=forced)
    own = simulate(dest, src, 'woven_fabric', 0, forced=forced, cumulative_centres=False)
    assert np.array_equal(quirk.image, own.image) and np.array_equal(quirk.mask, own.mask)
    # second centre: middle of the box spanning both patches, rows/cols 28..192 -> 110/224
    assert quirk.centres == [(40 / 224, 40 / 224), (110 / 224, 110 / 224)]
    assert quirk.answer == spec.ANSWER_TWO.format('top left', 'center')
    assert own.centres == [(40 / 224, 40 / 224), (180 / 224, 180 / 224)]
    assert own.answer == spec.ANSWER_TWO.format('top left', 'bottom right')


def test_two_patches_in_one_cell_name_it_once():
    dest, src = normal_image('wood_grain', 1), normal_image('ceramic_tiles', 2)
    res = simulate(dest, src, 'wood_grain', 0, forced=_forced((30, 30), (60, 60)))
    assert res.positions == ['top left', 'top left']
    assert res.answer == spec.ANSWER_TWO_SAME.format('top left')


def test_answer_templates():
    assert answer_for([]) == spec.ANSWER_NORMAL
    assert answer_for(['left']) == 'Yes, there is an anomaly in the image, at the left of the image.'
    assert answer_for(['top', 'bottom']) == \
        'Yes, there are 2 anomalies in the image, they are at the top and bottom of the image.'
    with pytest.raises(ValueError):
        answer_for(['top', 'left', 'right'])


def test_no_patch_placed_is_a_normal_sample():
    dest, src = _pair(2)
    res = simulate(dest, src, NAMES[2], 0, params=SimParams(min_mask_px=10 ** 9))
    assert res.answer == spec.ANSWER_NORMAL and not res.positions and not res.rects
    assert np.array_equal(res.image, dest) and not res.mask.any() and not res.binary_mask.any()


def test_forced_centre_off_the_image_is_rejected():
    dest, src = _pair(0)
    with pytest.raises(ValueError, match='does not fit'):
        simulate(dest, src, NAMES[0], 0, forced=_forced((5, 100)))


def test_background_skip_keeps_patches_on_the_part():
    assert SIM_PARAMS['washer'].background is not None
    bg = SIM_PARAMS['washer'].background
    for s in range(8):
        dest, src = normal_image('washer', s), normal_image('woven_fabric', s)
        res = simulate(dest, src, 'washer', s)
        obj = object_mask(dest, bg)
        for r0, r1, c0, c1 in res.rects:
            assert obj[r0:r1, c0:c1].mean() > 0.25   # min_overlap_pct of the (all-object) source patch


def test_logistic_label_values():
    dest = np.full((64, 64, 3), 100, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[12:52, 12:52] = 1
    for delta, k, x0 in ((7, 1 / 3, 7.0), (20, 1 / 3, 7.0), (15, 1 / 6, 15.0)):
        patched = dest.copy()
        patched[12:52, 12:52] += delta
        label = logistic_label(dest, patched, mask, (k, x0))
        assert label[32, 32] == pytest.approx(1 / (1 + np.exp(-k * (delta - x0))), abs=1e-6)
        assert label[:12].max() == 0
    assert not logistic_label(dest, dest, mask, (1 / 3, 7)).any()


def test_logistic_label_crop_equals_full_image_filter():
    rng = np.random.default_rng(0)
    dest = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
    patched = dest.copy()
    patched[3:40, 50:78] = rng.integers(0, 256, (37, 28, 3), dtype=np.uint8)
    mask = np.zeros((80, 80), np.uint8)
    mask[3:40, 50:78] = 1
    k, x0 = 1 / 3, 7.0
    diff = np.abs(dest.astype(np.float32) - patched).mean(-1)
    label_mask = cv2.medianBlur(((diff * mask) > 1).astype(np.uint8), 5)
    disk = np.add.outer(np.arange(-5, 6) ** 2, np.arange(-5, 6) ** 2) <= 25
    inten = ndimage.median_filter(diff * label_mask, footprint=disk, mode='nearest')
    expected = label_mask / (1 + np.exp(-k * (inten - x0)))
    np.testing.assert_allclose(logistic_label(dest, patched, mask, (k, x0)), expected, atol=1e-6)


def test_simulation_is_reproducible():
    dest, src = _pair(4)
    a, b = simulate(dest, src, NAMES[4], 9), simulate(dest, src, NAMES[4], 9)
    assert np.array_equal(a.image, b.image) and a.answer == b.answer and a.rects == b.rects


def test_bad_inputs():
    dest, _ = _pair(0)
    with pytest.raises(ValueError, match='uint8'):
        simulate(dest, dest[:100], NAMES[0], 0)


def test_label_centres_name_each_patch_where_its_label_lies():
    dest, src = normal_image('woven_fabric', 1), normal_image('washer', 2)
    forced = _forced((40, 40), (180, 180))
    box = simulate(dest, src, 'woven_fabric', 0, forced=forced)
    lab = simulate(dest, src, 'woven_fabric', 0, forced=forced, label_centres=True)
    assert np.array_equal(box.image, lab.image) and np.array_equal(box.mask, lab.mask)   # only the words change
    for (r, c), (r0, r1, c0, c1) in zip(lab.centres, lab.rects):
        rows, cols = np.nonzero(lab.binary_mask[r0:r1, c0:c1])
        assert (r, c) == pytest.approx(((r0 + rows.mean()) / 224, (c0 + cols.mean()) / 224))
    # each patch by its own label, so no cumulative box: the second patch is named bottom right, not center
    assert lab.positions == ['top left', 'bottom right']


def test_a_label_centre_moves_the_word_across_a_cell_border():
    # a patch whose box centre is just left of the 1/3 border, with its labelled part right of it
    dest, src = normal_image('ceramic_tiles', 1), normal_image('wood_grain', 2)
    res = simulate(dest, src, 'ceramic_tiles', 0, forced=_forced((112, 70), half=20), label_centres=True)
    binary = res.binary_mask.copy()
    binary[:, :75] = 0                       # keep only the label right of the border (col 74.7)
    assert spec.position_word(*_label_centroid(binary, res.rects[0], (224, 224))) == 'center'
    assert spec.position_word(112 / 224, 70 / 224) == 'left'
    assert _label_centroid(np.zeros_like(binary), res.rects[0], (224, 224)) is None   # empty label: box centre kept
