"""Where the LLM puts the borders of the 3x3 location grid: the language stage's reading of the map, alone.

  python -m anomalygpt_edge.benchmarks.llm_borders --json OUT.json NAME=WORK [NAME=WORK ...]

Location accuracy mixes two things: whether the map shows a defect in the right place, and whether the LLM names
the cell of what the map shows. This measures the second alone. Each WORK's model (the PyTorch reference, from
``final.pt``) is shown normal images of every class, each with one hot spot (a soft disk of radius 8 px) added to
the image's own map, drawn where the decoder's map shows that place of the image (``runtime.map_geometry``), at
1-px steps across each of the four borders between cells (across the middle row, down the middle column). For
each border: where the named cell changes (the place, in image pixels, past which fewer than half of the images
given a position name the outer cell), its offset from the true border, and the share of hot spots answered with a
position at all (an LLM may answer "No" to a hot spot on a normal image).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SPAN = 10          # px either side of each border
RADIUS = 8.0       # the hot spot's radius, px
PEAK = 0.95


def borders(size: int) -> list[dict]:
    """The four borders between the middle cell and its neighbours: the axis a hot spot moves along, the true
    border (px, the rule of ``runtime.answers.position_word``), and the word of the outer cell on which side."""
    from ..runtime.answers import CELL_BORDERS
    lo, hi = (b * size for b in CELL_BORDERS)
    return [{'name': 'left', 'axis': 'x', 'true': lo, 'outer': 'left', 'outer_below': True},
            {'name': 'right', 'axis': 'x', 'true': hi, 'outer': 'right', 'outer_below': False},
            {'name': 'top', 'axis': 'y', 'true': lo, 'outer': 'top', 'outer_below': True},
            {'name': 'bottom', 'axis': 'y', 'true': hi, 'outer': 'bottom', 'outer_below': False}]


def with_hot_spot(base: np.ndarray, u: float, axis: str, grid: int) -> np.ndarray:
    """``base`` (a map) with a hot spot at image place ``u`` along ``axis``, at the middle of the other axis."""
    from ..runtime.map_geometry import image_to_map
    h, w = base.shape
    mid = image_to_map((h - 1) / 2, h, grid)
    cx, cy = (image_to_map(u, w, grid), mid) if axis == 'x' else (mid, image_to_map(u, h, grid))
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    spot = PEAK / (1 + np.exp((np.hypot(xx - cx, yy - cy) - RADIUS) / 1.5))
    return np.maximum(base, spot).astype(np.float32)


def crossing(places, outer_share, outer_below: bool) -> float | None:
    """Where the share naming the outer cell falls through one half, moving from the outer cell inward
    (linear between steps); None if it never does within the span."""
    pts = list(zip(places, outer_share))
    if not outer_below:
        pts = pts[::-1]
    for (u0, s0), (u1, s1) in zip(pts, pts[1:]):
        if s0 >= 0.5 > s1:
            return u0 + (u1 - u0) * (s0 - 0.5) / (s0 - s1)
    return None


def measure(answer, bases: list[np.ndarray], grid: int) -> dict:
    """``answer(i, map)`` -> the position word the reader names for image ``i`` shown ``map`` (None: none).
    ``bases``: each image's own map. Per border: the place where the named cell changes among the answers that name
    one, its offset from the true border (px; positive: towards the right or the bottom); over all, the share of
    hot spots given any position."""
    size = bases[0].shape[1]
    out, answered, shown = {}, 0, 0
    for b in borders(size):
        centre = int(round(b['true']))
        places, share = [], []
        for u in range(centre - SPAN, centre + SPAN + 1):
            words = [w for i, base in enumerate(bases)
                     if (w := answer(i, with_hot_spot(base, u, b['axis'], grid))) is not None]
            answered += len(words)
            shown += len(bases)
            if words:   # of the images given a position, the share naming the outer cell
                places.append(u)
                share.append(sum(w == b['outer'] for w in words) / len(words))
        found = crossing(places, share, b['outer_below'])
        out[b['name']] = {'true': round(b['true'], 2), 'found': None if found is None else round(found, 2),
                          'offset': None if found is None else round(found - b['true'], 2)}
    offsets = [abs(v['offset']) for v in out.values() if v['offset'] is not None]
    return {'borders': out, 'mean_abs_offset': round(float(np.mean(offsets)), 2) if offsets else None,
            'answered': round(answered / shown, 3)}


def reference_reader(work: Path, config: str, per_class: int, seed: int):
    """(answer, bases, grid) of the trained model in ``work``: normal images of each class from the training
    generator (seed ``seed``), the reference's own map of each, and the LLM's first position word."""
    import torch

    from ..models import spec
    from ..models.generation import greedy_generate, prompt_text
    from ..models.reference import ReferencePipeline
    from ..models.synthetic import CATEGORIES, normal_image
    from ..models.synthetic_dataset import to_clip_tensor
    from ..models.text_features import text_feature_table
    from ..models.tokenizer import load_tokenizer
    from ..models.train import build_small, load_trained
    from .metrics import answer_positions
    model, text = build_small(work / 'tokenizer', 0, config)
    load_trained(work, model, text)
    tok = load_tokenizer(work / 'tokenizer')
    ref = ReferencePipeline(model, tok, text_feature_table(text, list(CATEGORIES)))
    images = []
    for name, category in CATEGORIES.items():
        for k in range(per_class):
            x = to_clip_tensor(normal_image(name, [seed, k]))[None]
            token, amap, _ = ref.vision(x, name.replace('_', ' '))
            images.append((token, amap[0, 0].numpy(), category.question))

    @torch.no_grad()
    def answer(i: int, amap: np.ndarray) -> str | None:
        token, _, question = images[i]
        prompts = model.prompt_learner(torch.from_numpy(amap)[None, None])
        embeds = model.prompt_embeds(tok, token, prompts, prompt_text(question), ref.bos_id)
        _, text_out = greedy_generate(model.llama_model, embeds, tok, ref.eos_id, 40)
        words = answer_positions(text_out, spec.POSITION_WORDS)
        return words[0] if words else None
    return answer, [m for _, m, _ in images], model.cfg.vision.grid


def markdown(results: dict) -> str:
    rows = ['| run | left | right | top | bottom | mean abs offset (px) | answered with a position |',
            '|---|---|---|---|---|---|---|']
    for name, r in results.items():
        cells = ['' if r['borders'][b]['offset'] is None else f"{r['borders'][b]['offset']:+.1f}"
                 for b in ('left', 'right', 'top', 'bottom')]
        mean = '' if r['mean_abs_offset'] is None else f"{r['mean_abs_offset']:.1f}"
        rows.append(f"| {name} | {' | '.join(cells)} | {mean} | {r['answered']:.2f} |")
    return '\n'.join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='python -m anomalygpt_edge.benchmarks.llm_borders', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('runs', nargs='+', metavar='NAME=WORK', help='a label and a training directory (final.pt)')
    ap.add_argument('--json', required=True, help='write the figures here')
    ap.add_argument('--config', default='small', help='the model config the runs were trained with')
    ap.add_argument('--per-class', type=int, default=4, help='normal images per class (default: %(default)s)')
    ap.add_argument('--seed', type=int, default=2000, help="the normal images' seed (default: %(default)s)")
    args = ap.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, sep, work = item.partition('=')
        if not sep or not name or not (Path(work) / 'final.pt').is_file():
            print(f"llm_borders: {item!r}: expected NAME=WORK with WORK/final.pt", file=sys.stderr)
            return 2
        runs[name] = Path(work)
    from ..runtime.engines import write_json_atomic
    results = {}
    for name, work in runs.items():
        answer, bases, grid = reference_reader(work, args.config, args.per_class, args.seed)
        results[name] = {'work': str(work), **measure(answer, bases, grid)}
        print(f"{name}: mean abs offset {results[name]['mean_abs_offset']} px", file=sys.stderr)
    report = {'images_per_class': args.per_class, 'seed': args.seed, 'span_px': SPAN, 'radius_px': RADIUS,
              'runs': results, 'table': markdown(results)}
    write_json_atomic(args.json, report)
    print(report['table'])
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
