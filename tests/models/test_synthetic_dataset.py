import cv2
import numpy as np
import pytest
import torch

from anomalygpt_edge.models import anomaly_sim, spec
from anomalygpt_edge.models.anomaly_sim import SimParams
from anomalygpt_edge.models.synthetic import normal_image
from anomalygpt_edge.models.synthetic_dataset import (FAINT_STRENGTH, SyntheticAnomalyDataset, collate_pairs,
                                                      defect_sample, layout_seed, to_clip_tensor, write_mvtec_layout)

MEAN = torch.tensor(spec.CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(spec.CLIP_STD).view(3, 1, 1)


def _to_uint8(t):
    return (t * STD + MEAN).mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def test_item_is_a_reference_style_pair():
    ds = SyntheticAnomalyDataset(12, seed=3)
    it = ds[7]
    dest, sim = ds.simulated(7)
    assert it['images'].shape == (2, 3, 224, 224) and it['images'].dtype == torch.float32
    assert it['masks'].shape == (2, 1, 224, 224)
    assert np.array_equal(_to_uint8(it['images'][0]), dest)
    assert np.array_equal(_to_uint8(it['images'][1]), sim.image)
    assert not it['masks'][0].any()
    assert torch.equal(it['masks'][1][0], torch.from_numpy(sim.mask > 0.3).float())
    assert set(it['masks'][1].unique().tolist()) <= {0.0, 1.0}
    q = spec.SYNTHETIC_DESCRIPTIONS[ds.category_of(7)] + ' ' + spec.QUESTION
    assert it['questions'] == [q, q]
    assert it['answers'] == [spec.ANSWER_NORMAL, sim.answer]
    assert it['category'] == ds.categories[7 % len(ds.categories)]


def test_deterministic_per_index_and_seed():
    a, b, c = SyntheticAnomalyDataset(10, seed=1), SyntheticAnomalyDataset(10, seed=1), SyntheticAnomalyDataset(10, seed=2)
    for i in (0, 4):
        x, y, z = a[i], b[i], c[i]
        assert torch.equal(x['images'], y['images']) and x['answers'] == y['answers']
        assert not torch.equal(x['images'][0], z['images'][0])


def test_cached_normals_give_the_same_items():
    plain, cached = SyntheticAnomalyDataset(8, seed=4), SyntheticAnomalyDataset(8, seed=4, cache_normals=True)
    for _ in range(2):   # second pass reads the cache
        for i in (1, 6):
            a, b = plain[i], cached[i]
            assert torch.equal(a['images'], b['images']) and torch.equal(a['masks'], b['masks'])
            assert a['answers'] == b['answers']


def test_epochs_resimulate_but_keep_the_normal_images():
    ds = SyntheticAnomalyDataset(10, seed=1)
    first = ds[2]
    ds.set_epoch(1)
    second = ds[2]
    assert torch.equal(first['images'][0], second['images'][0])
    assert not torch.equal(first['images'][1], second['images'][1])


def test_no_patch_means_both_items_are_normal(monkeypatch):
    monkeypatch.setitem(anomaly_sim.SIM_PARAMS, 'woven_fabric', SimParams(min_mask_px=10 ** 9))
    ds = SyntheticAnomalyDataset(4, seed=0, categories=['woven_fabric'])
    it = ds[1]
    assert it['answers'] == [spec.ANSWER_NORMAL, spec.ANSWER_NORMAL]
    assert torch.equal(it['images'][0], it['images'][1]) and not it['masks'].any()


def test_collate_flattens_pairs_in_order():
    ds = SyntheticAnomalyDataset(6, seed=0)
    items = [ds[0], ds[1]]
    batch = collate_pairs(items)
    assert batch['images'].shape == (4, 3, 224, 224) and batch['masks'].shape == (4, 1, 224, 224)
    assert torch.equal(batch['images'][2], items[1]['images'][0])
    assert batch['answers'] == items[0]['answers'] + items[1]['answers']
    # the normal image of each pair names no position, the simulated one its own
    assert batch['positions'] == [[], items[0]['positions'], [], items[1]['positions']]
    assert batch['categories'] == [items[0]['category']] * 2 + [items[1]['category']] * 2


def test_clip_normalisation():
    img = np.zeros((224, 224, 3), np.uint8)
    img[..., 0] = 255
    t = to_clip_tensor(img)
    assert t[0, 0, 0] == pytest.approx((1 - spec.CLIP_MEAN[0]) / spec.CLIP_STD[0])
    assert t[2, 5, 5] == pytest.approx(-spec.CLIP_MEAN[2] / spec.CLIP_STD[2])


def test_bad_dataset_args():
    with pytest.raises(ValueError):
        SyntheticAnomalyDataset(1)
    with pytest.raises(KeyError):
        SyntheticAnomalyDataset(4, categories=['carpet'])
    with pytest.raises(IndexError):
        SyntheticAnomalyDataset(4)[4]


def _read(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if img.ndim == 3 else img


def test_mvtec_layout(tmp_path):
    cats, kinds = ['wood_grain', 'washer'], ('scratch', 'hole')
    summary = write_mvtec_layout(tmp_path, cats, n_train_good=3, n_test_good=2, n_test_defect=2, seed=5,
                                 defect_kinds=kinds)
    assert summary == {c: {'train/good': 3, 'test/good': 2, 'test/scratch': 2, 'test/hole': 2} for c in cats}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cats)
    assert not [p for p in tmp_path.rglob('*') if p.name.startswith('.')]   # no temporary files left
    for c in cats:
        assert sorted(p.name for p in (tmp_path / c / 'train' / 'good').iterdir()) == ['000.png', '001.png', '002.png']
        assert len(list((tmp_path / c / 'test' / 'good').iterdir())) == 2
        assert sorted(p.name for p in (tmp_path / c / 'test').iterdir()) == sorted(['good', *kinds])
        goods = [_read(p) for p in sorted((tmp_path / c / 'train' / 'good').iterdir())]
        assert np.array_equal(goods[1], normal_image(c, layout_seed(5, c, 'train/good', 1)))
        assert not np.array_equal(goods[0], goods[1])
        for kind in kinds:
            assert sorted(p.name for p in (tmp_path / c / 'ground_truth' / kind).iterdir()) == \
                ['000_mask.png', '001_mask.png']
            for i in range(2):
                img = _read(tmp_path / c / 'test' / kind / f'{i:03d}.png')
                mask = _read(tmp_path / c / 'ground_truth' / kind / f'{i:03d}_mask.png')
                normal, res = defect_sample(c, kind, layout_seed(5, c, kind, i))
                assert img.shape == (224, 224, 3) and mask.shape == (224, 224) and mask.dtype == np.uint8
                assert set(np.unique(mask)) == {0, 255}
                assert np.array_equal(img, res.image) and np.array_equal(mask > 0, res.mask > 0)
                changed = np.abs(img.astype(int) - normal).max(-1) > 10
                near = cv2.dilate(mask, np.ones((7, 7), np.uint8)) > 0
                assert changed.any() and (changed & near).sum() / changed.sum() > 0.95


def test_foreign_fraction_mixes_in_foreign_blobs():
    nsa = SyntheticAnomalyDataset(10, seed=3)
    mixed = SyntheticAnomalyDataset(10, seed=3, foreign_fraction=1.0)
    for i in range(10):
        dest, a = nsa.simulated(i)
        _, b = mixed.simulated(i)
        assert a.rects and not b.rects        # NSA records its patch rectangles; a foreign blob has none
        assert not np.array_equal(a.image, b.image)
    # 0 keeps the reference's stream exactly (no extra draw)
    zero = SyntheticAnomalyDataset(10, seed=3, foreign_fraction=0.0)
    assert all(np.array_equal(nsa.simulated(i)[1].image, zero.simulated(i)[1].image) for i in range(4))
    half = SyntheticAnomalyDataset(40, seed=3, foreign_fraction=0.5)
    share = np.mean([not half.simulated(i)[1].rects for i in range(40)])
    assert 0.25 < share < 0.75
    with pytest.raises(ValueError, match='foreign_fraction'):
        SyntheticAnomalyDataset(4, foreign_fraction=1.5)


def test_faint_fraction_blends_the_anomaly_back_towards_the_normal_image():
    full = SyntheticAnomalyDataset(10, seed=4, foreign_fraction=0.5)
    faint = SyntheticAnomalyDataset(10, seed=4, foreign_fraction=0.5, faint_fraction=1.0)
    lo, hi = FAINT_STRENGTH
    checked = 0
    for i in range(10):
        dest, a = full.simulated(i)
        _, b = faint.simulated(i)
        assert b.answer == a.answer and np.array_equal(b.mask, a.mask)   # still labelled anomalous, same place
        change_a = a.image.astype(np.float32) - dest
        change_b = b.image.astype(np.float32) - dest
        big = np.abs(change_a) > 20
        if not big.any():       # a patch close to the surface's colours: nothing big enough to compare
            assert np.abs(change_b).max() <= np.abs(change_a).max()
            continue
        checked += 1
        keep = np.median(change_b[big] / change_a[big])
        assert lo - 0.05 < keep < hi + 0.05                                 # the same change, scaled down
        assert np.abs(change_b - keep * change_a).max() <= 1.5               # only rounding apart
        assert np.array_equal(faint.normal(i), dest)                        # the normal image is untouched
    assert checked >= 5
    with pytest.raises(ValueError, match='faint_fraction'):
        SyntheticAnomalyDataset(4, faint_fraction=-0.1)


def test_nsa_size_scale_draws_smaller_patches():
    def mean_rect_area(ds):
        areas = [(r1 - r0) * (c1 - c0) for i in range(24) for r0, r1, c0, c1 in ds.simulated(i)[1].rects]
        return np.mean(areas)

    reference = SyntheticAnomalyDataset(24, seed=5)
    # the reference's own scale keeps its stream exactly
    same = SyntheticAnomalyDataset(24, seed=5, nsa_size_scale=anomaly_sim.SIM_PARAMS['wood_grain'].gamma[1])
    assert all(np.array_equal(reference.simulated(i)[1].image, same.simulated(i)[1].image) for i in range(6))
    small = SyntheticAnomalyDataset(24, seed=5, nsa_size_scale=0.02)
    assert mean_rect_area(small) < 0.6 * mean_rect_area(reference)
    # the class's other settings stay: the washer keeps its object resize bounds and background skip
    params = small._sim_params('washer')
    assert params.gamma[1] == 0.02 and params.background == anomaly_sim.SIM_PARAMS['washer'].background
    with pytest.raises(ValueError, match='nsa_size_scale'):
        SyntheticAnomalyDataset(4, nsa_size_scale=0.0)


def test_nsa_thin_fraction_draws_stripes_within_the_reference_bounds():
    def sides(ds):
        return [(r1 - r0, c1 - c0) for i in range(24) for r0, r1, c0, c1 in ds.simulated(i)[1].rects]

    reference = SyntheticAnomalyDataset(24, seed=5)
    thin = SyntheticAnomalyDataset(24, seed=5, nsa_thin_fraction=1.0)
    # one side cut at twice the lower half-width bound (2 x 7 px here), resized by at most 2x
    bound = 4 * int(np.round(SimParams().width_bounds[0][0] * 224))
    assert all(min(hw) <= bound for hw in sides(thin)) and len(sides(thin)) >= 20
    # stripes: far more elongated patches than the reference's draw gives
    assert np.median([max(hw) / min(hw) for hw in sides(thin)]) > 2 * np.median(
        [max(hw) / min(hw) for hw in sides(reference)])
    # 0: the reference's stream exactly (no extra draw)
    off = SyntheticAnomalyDataset(24, seed=5, nsa_thin_fraction=0.0)
    assert all(np.array_equal(reference.simulated(i)[1].image, off.simulated(i)[1].image) for i in range(6))
    assert thin._sim_params('washer').background == anomaly_sim.SIM_PARAMS['washer'].background
    with pytest.raises(ValueError, match='nsa_thin_fraction'):
        SyntheticAnomalyDataset(4, nsa_thin_fraction=1.5)


def test_logistic_override_relabels_only_its_class():
    reference = SyntheticAnomalyDataset(40, seed=3, foreign_fraction=0.3)
    texture = SimParams().logistic
    relabelled = SyntheticAnomalyDataset(40, seed=3, foreign_fraction=0.3, logistic={'wood_grain': texture})
    wood_grew = 0
    for i in range(40):
        _, a = reference.simulated(i)
        _, b = relabelled.simulated(i)
        assert np.array_equal(a.image, b.image)                 # the same anomaly, only its label differs
        if reference.category_of(i) != 'wood_grain':
            assert np.array_equal(a.mask, b.mask)
            continue
        # the textures' logistic (1/3, 7) labels more of a subtle change than wood's softer (1/6, 15)
        assert b.binary_mask.sum() >= a.binary_mask.sum()
        wood_grew += int(b.binary_mask.sum() > a.binary_mask.sum())
    assert wood_grew >= 1
    with pytest.raises(KeyError, match='carpet'):
        SyntheticAnomalyDataset(4, logistic={'carpet': texture})


def test_label_centres_change_only_the_words():
    box, lab = SyntheticAnomalyDataset(8, seed=5), SyntheticAnomalyDataset(8, seed=5, label_centres=True)
    checked = 0
    for i in range(8):
        (_, a), (_, b) = box.simulated(i), lab.simulated(i)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
        for (r, c), (r0, r1, c0, c1) in zip(b.centres, b.rects):
            rows, cols = np.nonzero(b.binary_mask[r0:r1, c0:c1])
            if len(rows):
                assert (r, c) == pytest.approx(((r0 + rows.mean()) / 224, (c0 + cols.mean()) / 224))
                checked += 1
    assert checked >= 4                      # the dataset hands the option on: its patches were named by labels
