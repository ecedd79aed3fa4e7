import numpy as np
import pytest

from anomalygpt_edge.runtime.answers import (border_distance, locations, parse_verdict, position_word, regions,
                                             verdict_known)

WORDS = (('top left', 'top', 'top right'), ('left', 'center', 'right'), ('bottom left', 'bottom', 'bottom right'))


@pytest.mark.parametrize('answer,expected', [
    ('Yes, there is an anomaly in the image, at the top of the image.', 'yes'),
    ('No, there is no anomaly in the image.', 'no'),
    ('  yes.', 'yes'),
    ('There is an anomaly. Yes.', 'yes'),          # reference rule: 'Yes' in the answer
    ('Nothing is wrong', 'no'),                    # no first-word verdict: the reference's substring rule
    ('Yes and No', 'yes'),                         # the first word decides
    ('', 'unclear'),
    ('I cannot tell', 'unclear'),
])
def test_parse_verdict(answer, expected):
    assert parse_verdict(answer) == expected


def test_verdict_known_waits_for_the_word_to_end():
    assert not verdict_known('No')
    assert not verdict_known('Nor')
    assert verdict_known('No,')
    assert verdict_known('Yes ')
    assert not verdict_known('Normal')


@pytest.mark.parametrize('row,col,word', [
    (0.0, 0.0, 'top left'), (1 / 3, 1 / 3, 'top left'), (0.3334, 0.3334, 'center'),
    (2 / 3, 2 / 3, 'center'), (0.6667, 0.1, 'bottom left'), (0.1, 0.99, 'top right'), (0.5, 0.01, 'left'),
])
def test_position_word_thresholds(row, col, word):
    assert position_word(row, col, WORDS) == word


def test_locations_from_map():
    m = np.zeros((224, 224), np.float32)
    m[10:40, 180:220] = 0.9      # top right, larger
    m[150:170, 100:120] = 0.8    # bottom centre (rows 150-170 -> 0.71)
    m[100, 5] = 0.99             # a single hot pixel: below the minimum area
    assert locations(m, WORDS) == ['top right', 'bottom']
    assert locations(np.zeros((224, 224)), WORDS) == []
    assert locations(m, WORDS, threshold=0.85) == ['top right']


def test_locations_place_a_patch_where_it_is_in_the_image(align_corners_upsample):
    # patch column 5 of 16 covers image columns 70-83, in the centre column of cells (74.7 is the border);
    # the upsampled map puts its peak at 74.3, just left of the border
    scores = np.zeros((16, 16), np.float32)
    scores[7:9, 5] = 1.0
    m = align_corners_upsample(scores, 224)
    assert locations(m, WORDS, threshold=0.5) == ['left']                 # read in map coordinates
    assert locations(m, WORDS, threshold=0.5, grid=16) == ['center']      # read where the patch lies


def test_regions_give_each_hot_regions_box_centroid_area_and_peak():
    m = np.zeros((224, 224), np.float32)
    m[10:40, 180:220] = 0.9      # top right, larger
    m[20, 200] = 0.95            # its hottest pixel
    m[150:170, 100:120] = 0.8    # bottom centre
    m[100, 5] = 0.99             # below the minimum area
    big, small = regions(m, WORDS)
    assert (big['where'], small['where']) == ('top right', 'bottom')
    assert big['box'] == pytest.approx([180 / 224, 10 / 224, 220 / 224, 40 / 224])
    assert (big['x'], big['y']) == (pytest.approx(200 / 224), pytest.approx(25 / 224))
    assert big['area'] == pytest.approx(30 * 40 / 224 ** 2)
    assert (big['peak'], small['peak']) == (pytest.approx(0.95), pytest.approx(0.8))
    assert [r['where'] for r in regions(m, WORDS, threshold=0.85)] == ['top right']


def test_regions_of_an_upsampled_map_cover_their_patches_in_the_image(align_corners_upsample):
    # patches (rows 7-8, cols 5-6) span image pixels 98-126 x 70-98; bilinear upsampling puts the 0.5 contour
    # half-way between hot and cold patch centres, i.e. on the patches' edges, once read where it lies
    scores = np.zeros((16, 16), np.float32)
    scores[7:9, 5:7] = 1.0
    m = align_corners_upsample(scores, 224)
    (placed,), (raw,) = regions(m, WORDS, grid=16), regions(m, WORDS)
    assert placed['box'] == pytest.approx([70 / 224, 98 / 224, 98 / 224, 126 / 224], abs=1.5 / 224)
    assert placed['area'] == pytest.approx(28 * 28 / 224 ** 2, rel=0.1)
    assert placed['x'] == pytest.approx(84 / 224, abs=0.5 / 224) and placed['where'] == 'center'
    assert raw['box'][0] < 68 / 224 and raw['where'] == 'center'   # in map coordinates: stretched outward


def test_border_distance_is_the_gap_to_the_nearest_cell_border():
    assert border_distance(0.5, 0.5) == pytest.approx(1 / 6)          # the centre cell's middle
    assert border_distance(0.5, 0.34) == pytest.approx(0.34 - 1 / 3)  # just right of the left border
    assert border_distance(0.9, 0.05) == pytest.approx(0.9 - 2 / 3)
    # either side of a border, a hair apart, are different cells: why a map a few pixels off misses there
    assert position_word(0.5, 1 / 3 - 1e-3, WORDS) != position_word(0.5, 1 / 3 + 1e-3, WORDS)
