"""Heatmap overlays: the heat on the image, each hot region boxed where it lies."""
import numpy as np

from anomalygpt_edge.runtime.answers import regions
from anomalygpt_edge.runtime.overlay import overlay

WORDS = (('top left', 'top', 'top right'), ('left', 'center', 'right'), ('bottom left', 'bottom', 'bottom right'))


def test_each_region_is_boxed_on_the_image_at_its_own_size():
    m = np.zeros((224, 224), np.float32)
    m[112:168, 56:112] = 0.9                 # image columns 100-199, rows 240-359 of a 400x480 image
    rgb = np.full((480, 400, 3), 90, np.uint8)
    plain = overlay(rgb, m)
    boxed = overlay(rgb, m, regions=regions(m, WORDS))
    changed = np.nonzero(np.any(boxed != plain, axis=-1))
    assert (changed[1].min(), changed[1].max()) == (100, 199)       # the box's left and right sides
    assert changed[0].max() == 359 and 200 <= changed[0].min() < 240  # its bottom side; its word above its top
    assert (boxed[300, 100] == 255).all() and (boxed[300, 150] == plain[300, 150]).all()   # a side, the inside
