"""Where a point of the anomaly map lies in the image (the decoder's align_corners upsampling stretches it)."""
import numpy as np
import pytest

from anomalygpt_edge.runtime.map_geometry import image_to_map, map_at_size, map_to_image


@pytest.mark.parametrize('size,grid', [(224, 16), (448, 32), (224, 7)])
def test_map_to_image_puts_each_grid_point_on_its_patch_centre(size, grid):
    patch = size // grid
    for g in range(grid):
        assert map_to_image(g * (size - 1) / (grid - 1), size, grid) == pytest.approx(g * patch + (patch - 1) / 2)
    for v in (0.0, 17.3, size - 1.0):
        assert image_to_map(map_to_image(v, size, grid), size, grid) == pytest.approx(v)


def _centre_of_heat(m: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(m >= 0.5)
    return float(ys.mean()), float(xs.mean())


@pytest.mark.parametrize('col', [1, 5, 10, 14])   # the heat of an edge column is cut by the edge
def test_the_map_at_the_images_size_puts_a_patch_where_it_lies(col, align_corners_upsample):
    scores = np.zeros((16, 16), np.float32)
    scores[7:9, col] = 1.0
    m = align_corners_upsample(scores, 224)
    h, w = 448, 672                     # not square: each axis scales alone
    want_y, want_x = 8 * 14 * h / 224 - 0.5, (col * 14 + 7) * w / 224 - 0.5   # the patches' centre, in pixels
    y, x = _centre_of_heat(map_at_size(m, h, w, grid=16))
    assert (y, x) == (pytest.approx(want_y, abs=1.0), pytest.approx(want_x, abs=1.0))
    # a plain resize keeps the stretch: the map shows the image's pixel u (of 224) at u + (u - 111.5) 13 / 210
    y, x = _centre_of_heat(map_at_size(m, h, w))
    assert abs(x - want_x) == pytest.approx(abs(col * 14 + 6.5 - 111.5) * 13 / 210 * w / 224, abs=1.0)
