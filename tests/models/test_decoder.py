"""The zero-shot decoder's logits (models/decoder.py)."""
import pytest
import torch

from anomalygpt_edge.models import spec
from anomalygpt_edge.models.decoder import LinearLayer, layer_logits, zero_shot_map


def test_logit_scale_multiplies_the_cosine_logits_and_defaults_to_the_reference():
    torch.manual_seed(0)
    dec = LinearLayer(8, 6)
    taps = [torch.randn(2, 256, 8) for _ in range(spec.N_TAPS)]
    tf = torch.nn.functional.normalize(torch.randn(2, 6), dim=-1)
    full = layer_logits(dec, taps, tf)
    for a, b in zip(layer_logits(dec, taps, tf, scale=4.0), full):
        torch.testing.assert_close(a * spec.LOGIT_SCALE / 4.0, b, rtol=1e-4, atol=1e-4)  # x25 magnifies rounding
    # every logit is the scale times a cosine, so none exceeds the scale
    assert max(float(t.abs().max()) for t in full) <= spec.LOGIT_SCALE
    probs = torch.stack([torch.softmax(lg, dim=1)[:, 1] for lg in full]).mean(0).unsqueeze(1)
    torch.testing.assert_close(zero_shot_map(dec, taps, tf), probs)


def test_the_runtime_reads_the_decoders_upsampled_map_where_the_patch_lies():
    """Every column of the 16x16 grid, alone, upsampled by the decoder: the runtime's location word is the cell of
    the patch's centre in the image (in map coordinates, column 5, just inside the centre cell, reads "left")."""
    from anomalygpt_edge.models.decoder import upsample
    from anomalygpt_edge.runtime.answers import locations, position_word
    n, size = spec.IMAGE_SIZE // 14, spec.IMAGE_SIZE
    patch = size // n
    wrong_in_map_coordinates = 0
    for col in range(n):
        scores = torch.zeros(1, 1, n, n)
        scores[0, 0, 7:9, col] = 1.0   # two patches tall, so that an edge column's half region still counts
        m = upsample(scores, size)[0, 0].numpy()
        want = position_word((7.5 * patch + (patch - 1) / 2) / size, (col * patch + (patch - 1) / 2) / size,
                             spec.POSITION_WORDS)
        assert locations(m, spec.POSITION_WORDS, threshold=0.5, grid=n) == [want], col
        wrong_in_map_coordinates += locations(m, spec.POSITION_WORDS, threshold=0.5) != [want]
    assert wrong_in_map_coordinates > 0


def test_a_patch_label_drawn_as_a_map_lies_where_the_decoder_shows_that_patch():
    from anomalygpt_edge.models.decoder import label_as_map, upsample
    n, size = spec.IMAGE_SIZE // 14, spec.IMAGE_SIZE

    def centroid(m):
        ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')
        return float((m * ys).sum() / m.sum()), float((m * xs).sum() / m.sum())
    for row, col in ((7, 5), (2, 13), (10, 10)):
        label = torch.zeros(1, 1, size, size)
        label[0, 0, row * 14:(row + 1) * 14, col * 14:(col + 1) * 14] = 1.0
        scores = torch.zeros(1, 1, n, n)
        scores[0, 0, row, col] = 1.0
        want = centroid(upsample(scores, size)[0, 0])
        got = centroid(label_as_map(label, n)[0, 0])
        assert got == (pytest.approx(want[0], abs=0.5), pytest.approx(want[1], abs=0.5))
        assert abs(centroid(label[0, 0])[1] - want[1]) > 2.0   # the label itself lies elsewhere in the map
