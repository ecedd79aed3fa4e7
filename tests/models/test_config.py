"""Configs pick sizes only: a config's taps are the residual outputs of exactly the blocks it names."""
import torch

from anomalygpt_edge.models.config import CONFIGS, get_config
from anomalygpt_edge.models.imagebind import VisionTower


def test_the_tower_taps_the_blocks_its_config_names_even_when_unevenly_spaced():
    cfg = get_config('small-deep').vision
    assert cfg.taps == (3, 5, 6, 7) and len(cfg.taps) == len(get_config('small').vision.taps)
    torch.manual_seed(0)
    tower = VisionTower(cfg).eval()
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        _, taps = tower(image)
        x = tower.modality_trunks['vision'].pre_transformer_layer(tower.preprocessor(image)).transpose(0, 1)
        after = []
        for blk in tower.modality_trunks['vision'].blocks:
            x = blk(x)
            after.append(x.transpose(0, 1)[:, 1:])
    assert len(taps) == 4
    for tap, block in zip(taps, cfg.taps):
        torch.testing.assert_close(tap, after[block], rtol=0, atol=0)


def test_every_config_taps_four_blocks_of_its_tower():
    for name, cfg in CONFIGS.items():
        assert len(cfg.vision.taps) == 4, name
        assert all(0 <= t < cfg.vision.blocks for t in cfg.vision.taps), name
        assert list(cfg.vision.taps) == sorted(set(cfg.vision.taps)), name
