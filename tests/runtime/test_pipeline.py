"""The device pipeline (ONNX Runtime + llama.cpp) equals the PyTorch reference pipeline on the tiny bundle."""
import cv2
import numpy as np
import pytest
import torch

from anomalygpt_edge.models.reference import ReferencePipeline
from anomalygpt_edge.runtime.pipeline import Pipeline
from anomalygpt_edge.runtime.preprocess import ImageError

MAP_ATOL = 1e-4


def textured(seed: int, defect: bool = False) -> np.ndarray:
    """A real-looking RGB image: smoothed noise texture, optionally with a dark blob."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(60, 200, (240, 320, 3), dtype=np.uint8), (0, 0), 2)
    if defect:
        cv2.circle(img, (250, 60), 18, (20, 20, 20), -1)
    return img


@pytest.fixture(scope='session')
def pipeline(tiny_bundle):
    with Pipeline.from_bundle(tiny_bundle, verify_hashes=True, exact_llm=True, max_new_tokens=24, threads=1) as p:
        yield p


@pytest.fixture(scope='session')
def reference(tiny_model, tiny_tokenizer, pipeline):
    feats = {name: torch.from_numpy(pipeline.text_features[c['row']]) for name, c in pipeline.classes.items()}
    return ReferencePipeline(tiny_model, tiny_tokenizer, feats, max_new_tokens=24)


@pytest.fixture(scope='session')
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp('images')
    paths = []
    for i in range(5):
        p = d / f'img{i}.png'
        cv2.imwrite(str(p), textured(i, defect=i % 2 == 1)[..., ::-1])
        paths.append(p)
    return paths


def assert_same_text(a: str, b: str) -> None:
    """Equal answers. A random-weight model can emit byte tokens that are not valid UTF-8, which HF and
    llama.cpp render with different replacement characters; the ids are compared exactly elsewhere."""
    if '\ufffd' in a or '\ufffd' in b:
        assert a.split('\ufffd')[0][:-1] == b.split('\ufffd')[0][:-1]
    else:
        assert a == b


def reference_input(pipeline, path, mode=None):
    return torch.from_numpy(pipeline.load(path, mode)[0])


@pytest.mark.parametrize('k', [0, 1, 4])
def test_map_and_answer_equal_the_reference(pipeline, reference, images, k):
    refs = images[1:1 + k] if k else None
    got = pipeline.inspect(images[0], class_name='bottle', references=refs)
    ref_refs = torch.cat([reference_input(pipeline, r, 'center_crop') for r in refs]) if refs else None
    want = reference.inspect(reference_input(pipeline, images[0]), class_name='bottle', references=ref_refs)
    assert got.few_shot == bool(k)
    assert np.abs(got.anomaly_map - want.anomaly_map).max() <= MAP_ATOL
    assert got.score == pytest.approx(want.score, abs=MAP_ATOL)
    assert got.answer_ids == want.answer_ids
    assert got.verdict == want.verdict
    assert_same_text(got.answer, want.answer)


def test_second_frame_reuses_the_prefix_and_still_matches(pipeline, reference, images):
    for path in images[2:4]:
        got = pipeline.inspect(path, class_name='screw')
        want = reference.inspect(reference_input(pipeline, path), class_name='screw')
        assert got.answer_ids == want.answer_ids


def test_chat_second_turn_equals_full_reprefill(pipeline, reference, images):
    chat = pipeline.chat(images[1], class_name='bottle')
    a1 = chat.ask()
    a2 = chat.ask('Where is it?')
    x = reference_input(pipeline, images[1])
    first = reference.inspect(x, class_name='bottle')
    assert_same_text(a1, first.answer)
    q1 = pipeline.question('bottle', None, None)
    second = reference.inspect(x, class_name='bottle', question='Where is it?', history=[(q1, first.answer)])
    assert_same_text(a2, second.answer)


def test_verdict_first_and_no_llm(pipeline, images):
    full = pipeline.inspect(images[0], class_name='bottle')
    quick = pipeline.inspect(images[0], class_name='bottle', verdict_first=True)
    if full.verdict in ('yes', 'no'):
        assert quick.verdict == full.verdict
        assert len(quick.answer_ids) <= len(full.answer_ids)
        assert 'time_to_verdict' in quick.timings_ms
    bare = pipeline.inspect(images[0], class_name='bottle', llm=False)
    assert bare.verdict is None and bare.answer is None
    np.testing.assert_array_equal(bare.anomaly_map, full.anomaly_map)


def test_a_question_that_leaves_little_room_gets_the_answer_cut_at_the_context_end(pipeline, reference, images):
    from anomalygpt_edge.runtime.answers import parse_verdict
    token, _, prompts = pipeline.vision(pipeline.load(images[0])[0], 'bottle')

    def prompt_len(q):
        return sum(len(seg[1]) for seg in pipeline.llm_segments(token, prompts, pipeline.prompt_text(q), None))
    q, n_ctx = 'Is it scratched?', pipeline.session.n_ctx
    while prompt_len(q + ' Is it scratched?') <= n_ctx - 3:
        q += ' Is it scratched?'
    room = n_ctx - prompt_len(q)
    got = pipeline.inspect(images[0], class_name='bottle', question=q)
    want = reference.inspect(reference_input(pipeline, images[0]), class_name='bottle', question=q)
    # every position filled, then one more token chosen from the last logits
    assert 3 <= room < len(want.answer_ids) - 1 and got.answer_ids == want.answer_ids[:room + 1]
    assert got.answer and got.verdict == parse_verdict(got.answer) and pipeline.session.n_past == n_ctx
    assert pipeline.inspect(images[0], class_name='bottle').answer_ids == \
        reference.inspect(reference_input(pipeline, images[0]), class_name='bottle').answer_ids


def test_bad_inputs_then_the_next_image_works(pipeline, images, tmp_path):
    cases = {'zero.png': b'', 'text.png': b'hello', 'trunc.jpg': cv2.imencode('.jpg', textured(0))[1].tobytes()[:500]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match=name):
            pipeline.inspect(tmp_path / name, class_name='bottle', llm=False)
    with pytest.raises(ImageError, match='missing.png'):
        pipeline.inspect(tmp_path / 'missing.png', llm=False)
    gray16 = tmp_path / 'gray16.png'
    cv2.imwrite(str(gray16), (textured(3)[..., 0].astype(np.uint16) * 257))
    assert pipeline.inspect(gray16, class_name='bottle', llm=False).anomaly_map.shape == (224, 224)
    assert pipeline.inspect(images[0], class_name='bottle').answer is not None


def test_class_resolution_and_unknown_class(pipeline):
    assert pipeline.resolve_class(None, 'This is a photo of a pipe fryum') == 'fryum'
    assert pipeline.resolve_class(None, None) == 'object'
    with pytest.raises(KeyError, match='unknown class'):
        pipeline.resolve_class('spaceship', None)


def test_int8_is_refused_without_any_int8_graph_and_falls_back_per_component_with_one(tiny_bundle, images):
    import copy
    from anomalygpt_edge.runtime.bundle import Bundle, BundleError
    bundle = Bundle.open(tiny_bundle)
    with pytest.raises(BundleError, match=r"precision 'int8'.*no component .* INT8 graph .*calibrate int8") as e:
        Pipeline(bundle, precision='int8', llm=False)
    assert str(tiny_bundle) in str(e.value)
    assert Pipeline(bundle, precision='auto', llm=False).precision == 'fp32'
    m = copy.deepcopy(bundle.manifest)
    m['components']['prompt_learner']['int8'] = m['components']['prompt_learner']['fp32']  # as if calibrated
    for precision in ('int8', 'auto'):
        p = Pipeline(Bundle(bundle.root, m), precision=precision, llm=False)
        assert p.precision == 'int8' and p.runners['encoder'].path.name == 'encoder.onnx'
        assert p.inspect(images[0], class_name='bottle', llm=False).anomaly_map.shape == (224, 224)


def test_memory_save_and_reload(pipeline, images, tmp_path):
    mem = pipeline.memory(images[1:3])
    assert mem.shape[:2] == (4, 2 * 256)
    pipeline.save_memory(tmp_path / 'bottle.npz', mem, 'bottle')
    loaded, cls = pipeline.load_memory(tmp_path / 'bottle.npz')
    assert cls == 'bottle'
    np.testing.assert_array_equal(loaded, mem)
    a = pipeline.inspect(images[0], class_name='bottle', memory=loaded, llm=False)
    b = pipeline.inspect(images[0], class_name='bottle', references=images[1:3], llm=False)
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_segment_prefill_gives_the_same_answers(tiny_bundle, pipeline, images):
    """The one-batch prefill (the default) and one llama.cpp call per segment answer alike."""
    assert pipeline.one_batch_prefill
    with Pipeline.from_bundle(tiny_bundle, exact_llm=True, max_new_tokens=24, threads=1, prefill='segments') as seg:
        for path in images[:3]:
            a = pipeline.inspect(path, class_name='bottle')
            b = seg.inspect(path, class_name='bottle')
            assert a.answer_ids == b.answer_ids
            np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    with pytest.raises(ValueError, match='prefill must be one of'):
        Pipeline.from_bundle(tiny_bundle, llm=False, prefill='all-at-once')


def test_two_threads_on_one_pipeline_get_the_answers_of_one(tmp_path):
    # the LLM (one llama.cpp context) is shared: unserialised, two threads crashed the process
    import subprocess
    import sys
    from pathlib import Path
    demo = Path(__file__).resolve().parents[2] / 'runtime' / 'demo'
    script = tmp_path / 'threads.py'
    script.write_text(f'''
import json, sys, threading
from pathlib import Path
from anomalygpt_edge.runtime.pipeline import Pipeline
demo = Path({str(demo)!r})
jobs = [(p, p.name.rsplit('-', 1)[0]) for p in sorted((demo / 'samples').glob('*.png'))[:6]]
with Pipeline.from_bundle(demo / 'bundle', threads=1) as pipe:
    alone = [pipe.inspect(p, class_name=c).answer for p, c in jobs]
    together = [None] * len(jobs)
    def work(k):
        for i in range(k, len(jobs), 2):
            together[i] = pipe.inspect(jobs[i][0], class_name=jobs[i][1]).answer
    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
print(json.dumps([alone, together]))
''')
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json
    alone, together = json.loads(out.stdout.strip().splitlines()[-1])
    assert together == alone and all(alone)


@pytest.mark.parametrize('memory', [np.zeros((4, 0, 8), np.float32), np.full((4, 256, 8), np.nan, np.float32)])
def test_an_unusable_memory_is_refused_and_spoils_nothing(pipeline, images, memory):
    before = pipeline.inspect(images[1], class_name='bottle')
    with pytest.raises(ValueError, match='few-shot memory'):
        pipeline.inspect(images[0], class_name='bottle', memory=memory)
    after = pipeline.inspect(images[1], class_name='bottle')
    assert after.answer == before.answer and after.score == before.score


def test_non_finite_embeddings_never_reach_the_llm(pipeline, images):
    from anomalygpt_edge.runtime.runners import RunnerError
    before = pipeline.inspect(images[2], class_name='bottle')
    keys = list(pipeline._kv_keys)
    x, _, _ = pipeline.load(images[2])
    token, _, prompts = pipeline.vision(x, 'bottle')
    prompts = prompts.copy()
    prompts[0, 3, 0] = np.nan
    with pytest.raises(RunnerError, match='non-finite'):
        pipeline.answer(pipeline.llm_segments(token, prompts, 'Is there any anomaly?', object()))
    assert pipeline._kv_keys == keys
    assert pipeline.inspect(images[2], class_name='bottle').answer == before.answer


def test_a_tiny_array_is_refused_like_a_tiny_file(pipeline):
    for shape in [(1, 1, 3), (0, 0, 3), (15, 200, 3)]:
        with pytest.raises(ImageError, match='at least 16x16'):
            pipeline.inspect(np.zeros(shape, np.uint8), class_name='bottle')


def test_a_closed_pipeline_refuses_to_run(tiny_bundle, images):
    with Pipeline.from_bundle(tiny_bundle, max_new_tokens=4, threads=1) as p:
        chat = p.chat(images[0], class_name='bottle')
    for call in (lambda: p.inspect(images[0], class_name='bottle'), chat.ask,
                 lambda: p.chat(images[0], class_name='bottle')):
        with pytest.raises(RuntimeError, match='closed'):
            call()
    with pytest.raises(ValueError, match='threads must be at least 1'):
        Pipeline.from_bundle(tiny_bundle, threads=0)


def test_a_mono_camera_frame_gives_the_answer_of_its_rgb_copy(pipeline):
    grey = cv2.cvtColor(textured(7, defect=True), cv2.COLOR_RGB2GRAY)
    mono = pipeline.inspect(grey, class_name='bottle')
    rgb = pipeline.inspect(np.repeat(grey[..., None], 3, axis=2), class_name='bottle')
    assert mono.answer == rgb.answer and mono.score == rgb.score


def test_a_frame_can_be_labelled_and_a_region_level_out_of_range_is_refused(pipeline):
    frame = textured(8)
    assert pipeline.inspect(frame, class_name='bottle', llm=False, label='cam0/000123').image == 'cam0/000123'
    assert pipeline.inspect(frame, class_name='bottle', llm=False).image == '<array>'
    for level in (0.0, -1.0, 1.5):
        with pytest.raises(ValueError, match=r'threshold is a map level in \(0, 1\]'):
            pipeline.inspect(frame, class_name='bottle', llm=False, threshold=level)
