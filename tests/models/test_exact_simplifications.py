"""The rewrites the exporters rely on equal the reference computation on random weights."""
import torch
import torch.nn.functional as F

from anomalygpt_edge.models.decoder import few_shot_map, few_shot_map_matmul, upsample, zero_shot_map
from anomalygpt_edge.models.imagebind import fold_stem_to_conv2d


def test_conv3d_over_repeated_frames_equals_conv2d_with_summed_kernels(tiny_model):
    pre = tiny_model.visual_encoder.preprocessor
    x = torch.randn(2, 3, 224, 224)
    conv3d = pre.rgbt_stem.proj[1]
    with torch.no_grad():
        ref = pre.rgbt_stem.proj(x)[:, :, 0]
        folded = F.conv2d(x, fold_stem_to_conv2d(conv3d.weight), stride=14)
    assert ref.shape == folded.shape == (2, 64, 16, 16)
    torch.testing.assert_close(folded, ref, atol=1e-5, rtol=1e-4)


def test_two_way_softmax_after_upsampling_equals_sigmoid_of_difference():
    logits = torch.randn(3, 2, 16, 16) * 5
    soft = torch.softmax(upsample(logits), dim=1)[:, 1]
    sig = torch.sigmoid(upsample(logits[:, 1:2] - logits[:, 0:1]))[:, 0]
    torch.testing.assert_close(sig, soft, atol=2e-6, rtol=0)


def test_few_shot_cosine_max_equals_normalise_matmul_max():
    query = [torch.randn(2, 256, 48) for _ in range(4)]
    memory = [torch.randn(512, 48) for _ in range(4)]
    ref = few_shot_map(query, memory)
    sims = [(F.normalize(q, dim=-1) @ F.normalize(m, dim=-1).T).max(dim=-1).values for q, m in zip(query, memory)]
    sim = torch.stack(sims).mean(0).reshape(2, 1, 16, 16)
    torch.testing.assert_close(1 - upsample(sim), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(few_shot_map_matmul(query, memory), ref, atol=1e-6, rtol=0)  # training's form


def test_zero_shot_map_matches_a_literal_per_layer_recomputation(tiny_model):
    torch.manual_seed(0)
    taps = [torch.randn(2, 256, 64) for _ in range(4)]
    text = F.normalize(torch.randn(2, 32), dim=-1)
    got = zero_shot_map(tiny_model.image_decoder, taps, text)
    assert got.shape == (2, 1, 224, 224) and 0 <= got.min() and got.max() <= 1
    per_layer = []
    for fc, t in zip(tiny_model.image_decoder.fc, taps):
        f = fc(t)
        f = f / f.norm(dim=-1, keepdim=True)
        lg = (100 * f @ text.T).permute(0, 2, 1).reshape(2, 2, 16, 16)
        per_layer.append(torch.softmax(F.interpolate(lg, 224, mode='bilinear', align_corners=True), 1)[:, 1])
    torch.testing.assert_close(got[:, 0], torch.stack(per_layer).mean(0))
