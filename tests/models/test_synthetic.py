import cv2
import numpy as np
import pytest

from anomalygpt_edge.models import spec
from anomalygpt_edge.models.anomaly_sim import object_mask
from anomalygpt_edge.models.defects import DEFECT_KINDS, add_defect
from anomalygpt_edge.models.synthetic import CATEGORIES, normal_image

NAMES = sorted(CATEGORIES)


@pytest.mark.parametrize('name', NAMES)
def test_deterministic_per_seed_and_varied_across_seeds(name):
    a, b, c = normal_image(name, 5), normal_image(name, 5), normal_image(name, 6)
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 2
    rng = np.random.default_rng(1)
    assert not np.array_equal(normal_image(name, rng), normal_image(name, rng))  # the generator advances


def _features(img):
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx, gy = np.abs(np.diff(g, axis=1)).mean(), np.abs(np.diff(g, axis=0)).mean()
    return np.array([*img.reshape(-1, 3).mean(0), g.std(), gx, gy, gx / (gy + 1e-3) * 10])


def test_categories_are_distinct_and_consistent():
    # nearest-centroid on simple colour/texture features must sort held-out samples perfectly:
    # each category has one look, and the looks differ
    train = {n: np.mean([_features(normal_image(n, s)) for s in range(4)], 0) for n in NAMES}
    for n in NAMES:
        for s in range(100, 103):
            f = _features(normal_image(n, s))
            nearest = min(NAMES, key=lambda m: np.linalg.norm((f - train[m])))
            assert nearest == n, (n, s, nearest)


@pytest.mark.parametrize('name', NAMES)
def test_descriptions_follow_the_reference_style(name):
    cat = CATEGORIES[name]
    assert cat.description.startswith('This is a photo of ') and ' for anomaly detection, ' in cat.description
    assert cat.description.endswith('without any damage, flaw, defect, scratch, hole or broken part.')
    assert cat.question == cat.description + ' ' + spec.QUESTION


def test_unknown_category_is_a_clear_error():
    with pytest.raises(KeyError, match='unknown synthetic category'):
        normal_image('carpet', 0)


def test_washer_sits_on_a_plain_background():
    img = normal_image('washer', 3)
    obj = object_mask(img, CATEGORIES['washer'].background)
    assert obj[112, 112] == 0 and obj[5, 5] == 0 and obj[-5, -5] == 0   # hole and corners are background
    assert obj[112, 112 + 50] == 1 and obj[112 - 50, 112] == 1        # the ring is the part
    assert 0.15 < obj.mean() < 0.4


@pytest.mark.parametrize('kind,lo,hi', [('scratch', 60, 2500), ('stain', 150, 5000), ('hole', 100, 3000)])
@pytest.mark.parametrize('name', ['woven_fabric', 'ceramic_tiles', 'washer'])
def test_defect_mask_matches_the_change(kind, lo, hi, name):
    img = normal_image(name, 11)
    res = add_defect(img, kind, name, 4)
    assert lo <= res.mask.sum() <= hi
    diff = np.abs(img.astype(int) - res.image).max(-1)
    assert diff[res.mask > 0].mean() > 8                                  # visible where the mask says
    far = cv2.dilate(res.mask, np.ones((31, 31), np.uint8)) == 0
    assert diff[far].max() == 0                                           # untouched away from it
    assert res.answer == spec.ANSWER_ONE.format(res.positions[0]) and res.question.endswith(spec.QUESTION)


@pytest.mark.parametrize('kind', DEFECT_KINDS)
def test_defect_position_word_comes_from_its_centroid(kind):
    img = normal_image('brushed_metal', 2)
    for i in range(3):
        for j in range(3):
            centre = (int((i + 0.5) * 224 / 3), int((j + 0.5) * 224 / 3))
            res = add_defect(img, kind, 'brushed_metal', 10 * i + j, centre=centre)
            m = cv2.moments(res.mask, binaryImage=True)
            assert res.centroid == pytest.approx((m['m01'] / m['m00'] / 224, m['m10'] / m['m00'] / 224))
            assert np.hypot(res.centroid[0] * 224 - centre[0], res.centroid[1] * 224 - centre[1]) < 20
            assert res.positions == [spec.POSITION_WORDS[i][j]]
            assert res.answer == spec.ANSWER_ONE.format(spec.POSITION_WORDS[i][j])


def test_random_defects_on_an_object_land_on_the_part():
    for s in range(6):
        img = normal_image('washer', s)
        res = add_defect(img, DEFECT_KINDS[s % 3], 'washer', s)
        obj = object_mask(img, CATEGORIES['washer'].background)
        r, c = (int(round(v * 224)) for v in res.centroid)
        assert obj[max(r - 3, 0):r + 4, max(c - 3, 0):c + 4].any(), (s, res.centroid)


def test_unknown_defect_kind():
    with pytest.raises(ValueError, match='unknown defect kind'):
        add_defect(normal_image('wood_grain', 0), 'crack', 'wood_grain', 0)
