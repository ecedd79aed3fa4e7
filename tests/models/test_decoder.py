"""The zero-shot decoder's logits (models/decoder.py)."""
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
