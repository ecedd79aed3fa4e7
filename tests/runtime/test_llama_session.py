"""LlamaSession: batching, context limits, KV truncation, generation rules, and clear load errors."""
import subprocess
import sys

import numpy as np
import pytest

from anomalygpt_edge.runtime.llama_session import ContextFullError, LlamaError, LlamaSession

pytest.importorskip('llama_cpp')


@pytest.fixture(scope='module')
def prompt(tiny_tokenizer):
    """Token and embedding segments, like the AnomalyGPT prompt."""
    rng = np.random.default_rng(0)
    ids = tiny_tokenizer.encode("### Human: <Img> Is there any anomaly in the image?", add_special_tokens=False)
    return [1] + ids, (rng.standard_normal((9, 64)) * 0.5).astype(np.float32)


def run(session, ids, embeds):
    session.eval_tokens(ids)
    session.eval_embeddings(embeds)
    session.eval_tokens(ids[1:6])
    return session.logits()


def test_batches_larger_than_n_batch_are_split(tiny_gguf_f32, prompt):
    ids, embeds = prompt
    assert len(ids) > 4 and len(embeds) > 4
    with LlamaSession(tiny_gguf_f32, n_ctx=256, exact=True) as whole:
        ref = run(whole, ids, embeds)
    with LlamaSession(tiny_gguf_f32, n_ctx=256, n_batch=4, exact=True) as small:
        got = run(small, ids, embeds)
        assert small.n_past == len(ids) + len(embeds) + 5
        assert small.history == ids + [None] * len(embeds) + ids[1:6]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert np.abs(ref).max() > 0.1  # real logits, not zeros


def test_context_overflow_raises_and_session_survives(tiny_gguf_f32):
    with LlamaSession(tiny_gguf_f32, n_ctx=256, n_batch=64) as s:
        assert s.n_ctx == 256
        s.eval_tokens([5] * 250)
        with pytest.raises(LlamaError, match=r'context full: 250 positions used \+ 10 new > n_ctx 256'):
            s.eval_tokens([6] * 10)
        assert s.n_past == 250 and len(s.history) == 250
        s.eval_tokens([6] * 6)  # exactly full
        assert s.n_past == 256
        with pytest.raises(LlamaError, match='n_ctx 256'):
            s.eval_embeddings(np.zeros((1, s.n_embd), np.float32))
        s.truncate(200)
        s.eval_tokens([7] * 10)
        assert s.n_past == 210 and s.logits().shape == (s.n_vocab,)


def test_n_batch_follows_the_context_and_an_overflow_is_refused_before_any_decode(tiny_gguf_f32):
    # llama.cpp lowers n_batch to n_ctx and aborts the process on a larger batch
    with LlamaSession(tiny_gguf_f32, n_ctx=256, n_batch=512) as s:
        assert s.n_batch == 256
        s.eval_tokens([5] * 100)
        with pytest.raises(ContextFullError, match=r'100 positions used \+ 300 new > n_ctx 256 .*--n-ctx'):
            s.eval_tokens([6] * 300)
        with pytest.raises(ContextFullError, match=r'\+ 200 new > n_ctx 256'):
            s.eval_embeddings(np.zeros((200, s.n_embd), np.float32))
        assert s.n_past == 100
    with LlamaSession(tiny_gguf_f32, n_ctx=256, n_batch=64) as s:
        s.eval_tokens([5] * 100)
        with pytest.raises(ContextFullError):
            s.eval_tokens([6] * 200)  # the first two batches would fit
        assert s.n_past == 100 and len(s.history) == 100
        s.eval_tokens([6] * 156)
        assert s.n_past == 256 and s.logits().shape == (s.n_vocab,)


def test_truncate_then_reeval_reproduces_logits(tiny_gguf_f32, prompt):
    ids, embeds = prompt
    with LlamaSession(tiny_gguf_f32, n_ctx=256, exact=True) as s:
        s.eval_tokens(ids)
        s.eval_embeddings(embeds)
        prefix = s.n_past
        s.eval_tokens([20, 21, 22])
        first = s.logits()
        s.truncate(prefix)
        assert s.n_past == prefix and s.history == ids + [None] * len(embeds)
        with pytest.raises(LlamaError, match='no logits'):
            s.logits()
        s.eval_tokens([30, 31])  # something else in between
        s.truncate(prefix)
        s.eval_tokens([20, 21, 22])
        np.testing.assert_allclose(s.logits(), first, rtol=0, atol=1e-6)
        other = s.logits()
        s.reset()
        assert s.n_past == 0 and s.history == []
        s.eval_tokens(ids)
        s.eval_embeddings(embeds)
        s.eval_tokens([20, 21, 22])
        np.testing.assert_allclose(s.logits(), other, rtol=0, atol=1e-6)
        with pytest.raises(LlamaError, match='cannot truncate to 999'):
            s.truncate(999)


def test_generate_stops_and_keeps_the_cache(tiny_gguf_f32, prompt):
    ids, embeds = prompt
    with LlamaSession(tiny_gguf_f32, n_ctx=256, exact=True) as s:
        run(s, ids, embeds)
        start = s.n_past
        free_ids, free_text = s.generate(20, stop=())
        # every chosen token but the last is in the cache: the last one is never needed for a logit
        assert len(free_ids) == 20 and s.n_past == start + 19
        assert s.history[start:] == free_ids[:-1]
        assert free_text == s.detokenize(free_ids)
        texts = [s.detokenize(free_ids[:j]) for j in range(21)]
    # a stop string ends generation at the first token after which the text contains it
    stop = next(t[-1] for t in texts[3:] if t.strip())
    first = next(j for j in range(1, 21) if stop in texts[j])
    with LlamaSession(tiny_gguf_f32, n_ctx=256, exact=True) as s:
        run(s, ids, embeds)
        got, text = s.generate(20, stop=(stop,))
        assert got == free_ids[:first] and text == texts[first]
    with LlamaSession(tiny_gguf_f32, n_ctx=256, exact=True) as s:
        run(s, ids, embeds)
        seen = []
        got, _ = s.generate(20, stop=(), on_token=lambda t, txt: seen.append((t, txt)) or len(seen) == 3)
        assert got == free_ids[:3] and seen == [(free_ids[j], texts[j + 1]) for j in range(3)]
        # stopping at the third token cost two decode steps (the third was chosen, not evaluated)
        assert s.n_past == start + 2
        # and the session continues exactly where a free run would have gone
        more, _ = s.generate(5, stop=())
        assert more == free_ids[3:8]


def test_generate_stops_when_the_context_is_full_and_returns_the_answer_so_far(tiny_gguf_f32, prompt):
    ids, embeds = prompt
    filler = [5] * (256 - len(ids) - len(embeds) - 5 - 3)
    with LlamaSession(tiny_gguf_f32, n_ctx=512, exact=True) as s:
        s.eval_tokens(filler)
        run(s, ids, embeds)
        free_ids, _ = s.generate(20, stop=())
    with LlamaSession(tiny_gguf_f32, n_ctx=256, exact=True) as s:
        s.eval_tokens(filler)
        run(s, ids, embeds)
        assert s.n_past == 253
        got, text = s.generate(20, stop=())
        # three positions left: three tokens evaluated, a fourth chosen from the last logits
        assert got == free_ids[:4] and text == s.detokenize(got) and s.n_past == 256
        assert s.generate(20, stop=()) == ([], '')
        with pytest.raises(ContextFullError):
            s.logits()  # what follows the fourth token has no room


def test_generate_stops_at_eos_without_evaluating_it(tmp_path, tiny_gguf_f32, tiny_model, tiny_tokenizer_dir, prompt):
    from anomalygpt_edge.export.gguf_writer import LlamaHParams, load_spm_vocab, write_gguf
    from anomalygpt_edge.export.lora_merge import iter_merged_peft, merged_shapes
    ids, embeds = prompt
    with LlamaSession(tiny_gguf_f32, n_ctx=256, exact=True) as s:
        run(s, ids, embeds)
        free_ids, _ = s.generate(8, stop=())
    k = next(j for j in range(1, 8) if free_ids[j] not in free_ids[:j])
    lm = tiny_model.llama_model
    hp = LlamaHParams.from_hf_config(lm.get_base_model().config)
    vocab = load_spm_vocab(tiny_tokenizer_dir, hp.n_vocab)
    vocab.special_ids['eos'] = free_ids[k]  # same weights, but the k-th greedy token is now EOS
    path = write_gguf(tmp_path / 'eos.gguf', 'llama', hp, vocab, merged_shapes(lm), iter_merged_peft(lm), ftype='f32')
    with LlamaSession(path, n_ctx=256, exact=True) as s:
        assert s.eos_id == free_ids[k]
        run(s, ids, embeds)
        start = s.n_past
        got, text = s.generate(8, stop=())
        assert got == free_ids[:k] and s.n_past == start + k and text == s.detokenize(free_ids[:k])


def test_tokenize_roundtrip_and_facts(tiny_gguf_f32, tiny_tokenizer):
    with LlamaSession(tiny_gguf_f32, n_ctx=256) as s:
        assert (s.n_embd, s.n_vocab, s.bos_id, s.eos_id) == (64, len(tiny_tokenizer), 1, 2)
        for text in ("### Human: <Img>", "Yes, there is an anomaly.\n###", "é中 12"):
            assert s.detokenize(s.tokenize(text)) == text
            assert s.tokenize(text) == tiny_tokenizer.encode(text, add_special_tokens=False)
        assert s.tokenize('') == [] and s.detokenize([]) == ''
        with pytest.raises(LlamaError, match='out of range'):
            s.eval_tokens([s.n_vocab])
        with pytest.raises(LlamaError, match=r'embeddings must be \[n, 64\]'):
            s.eval_embeddings(np.zeros((2, 63), np.float32))
        with pytest.raises(LlamaError, match='no logits'):
            s.logits()


def test_token_embeddings_are_the_models_rows(tiny_gguf_f32, tiny_model):
    pytest.importorskip('gguf')
    ids = [1, 5, 399, 400]
    with LlamaSession(tiny_gguf_f32, n_ctx=256, exact=True) as s:
        rows = s.token_embeddings(ids)
        ref = tiny_model.llama_model.get_input_embeddings().weight[ids].detach().numpy()
        np.testing.assert_array_equal(rows, ref)
        s.eval_embeddings(rows)
        by_embedding = s.logits()
        s.reset()
        s.eval_tokens(ids)
        np.testing.assert_allclose(by_embedding, s.logits(), rtol=0, atol=1e-5)


def test_missing_and_corrupt_files_are_named(tmp_path, tiny_gguf_f32):
    with pytest.raises(LlamaError, match='nothing.gguf: no such GGUF file'):
        LlamaSession(tmp_path / 'nothing.gguf')
    (tmp_path / 'text.gguf').write_text('not a model')
    with pytest.raises(LlamaError, match='text.gguf: not a GGUF file'):
        LlamaSession(tmp_path / 'text.gguf')
    data = tiny_gguf_f32.read_bytes()
    (tmp_path / 'half.gguf').write_bytes(data[: len(data) // 2])
    with pytest.raises(LlamaError, match='half.gguf: llama.cpp could not load the model') as e:
        LlamaSession(tmp_path / 'half.gguf')
    assert "data is not within the file bounds" in str(e.value)  # llama.cpp's reason, without its log
    (tmp_path / 'header.gguf').write_bytes(data[:64])
    with pytest.raises(LlamaError, match='header.gguf: .*exceeds remaining file size'):
        LlamaSession(tmp_path / 'header.gguf')


def test_session_module_is_torch_free():
    code = ("import sys, anomalygpt_edge.runtime.llama_session as m; "
            "bad = [n for n in ('torch', 'transformers', 'anomalygpt_edge.models', 'anomalygpt_edge.export') "
            "if n in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope='module')
def tiny_gguf_quantized(tmp_path_factory, tiny_model, tiny_tokenizer_dir):
    from anomalygpt_edge.export.llm_export import export_llm
    out = tmp_path_factory.mktemp('gguf_q')
    export_llm(tiny_model.llama_model, tiny_tokenizer_dir, out, quants=('q8_0', 'q4_k_m'))
    return {q: out / f'llm-{q}.gguf' for q in ('q8_0', 'q4_k_m')}


@pytest.mark.parametrize('quant', ['f32', 'q8_0', 'q4_k_m'])
def test_one_batch_prompt_equals_segment_by_segment(tiny_gguf_f32, tiny_gguf_quantized, prompt, quant):
    """The whole prompt as one embedding batch (token rows from the GGUF's own, possibly quantized,
    table) gives the logits, history and greedy continuation of feeding each segment in turn."""
    pytest.importorskip('gguf')
    path = tiny_gguf_f32 if quant == 'f32' else tiny_gguf_quantized[quant]
    ids, embeds = prompt
    segments = [('tokens', ids), ('embeds', embeds), ('tokens', ids[1:6]), ('embeds', embeds[:2]), ('tokens', [])]
    results = {}
    for one_batch in (False, True):
        with LlamaSession(path, n_ctx=256, exact=True) as s:
            s.eval_segments(segments, one_batch=one_batch)
            n_past, history, logits = s.n_past, list(s.history), s.logits()
            results[one_batch] = (n_past, history, logits, s.generate(12, stop=())[0])
    (n0, h0, l0, g0), (n1, h1, l1, g1) = results[False], results[True]
    assert n0 == n1 == len(ids) + len(embeds) + 5 + 2
    assert h0 == h1 and h1[:len(ids)] == ids and h1[len(ids)] is None
    np.testing.assert_allclose(l1, l0, rtol=0, atol=1e-4 * max(1.0, float(np.abs(l0).max())))
    assert g1 == g0


def test_token_rows_are_cached_and_checked(tiny_gguf_f32):
    pytest.importorskip('gguf')
    with LlamaSession(tiny_gguf_f32, n_ctx=256) as s:
        a = s.token_embeddings([3, 4, 3])
        assert a.shape == (3, 64) and np.array_equal(a[0], a[2]) and not np.array_equal(a[0], a[1])
        assert set(s._embd_rows) == {3, 4}
        assert s.token_embeddings([]).shape == (0, 64)
        with pytest.raises(LlamaError, match='out of range'):
            s.token_embeddings([s.n_vocab])


def test_an_unreadable_token_table_falls_back_to_segments(tiny_gguf_quantized, prompt, monkeypatch):
    """A token-embedding type the gguf reader cannot dequantize: one warning, then the prompt goes
    segment by segment and gives the same logits."""
    gguf = pytest.importorskip('gguf')
    ids, embeds = prompt
    segments = [('tokens', ids), ('embeds', embeds), ('tokens', ids[1:6])]
    with LlamaSession(tiny_gguf_quantized['q8_0'], n_ctx=256, exact=True) as s:
        s.eval_segments(segments, one_batch=False)
        want = s.logits()

    def refuse(*_a, **_k):
        raise NotImplementedError('no numpy dequantization for this type')
    monkeypatch.setattr(gguf.quants, 'dequantize', refuse)
    with LlamaSession(tiny_gguf_quantized['q8_0'], n_ctx=256, exact=True) as s:
        with pytest.warns(RuntimeWarning, match='cannot read token_embd.weight'):
            s.eval_segments(segments)
        np.testing.assert_array_equal(s.logits(), want)
        assert s.history[:len(ids)] == ids and s.n_past == len(ids) + len(embeds) + 5
        with pytest.raises(LlamaError, match='cannot read token_embd.weight'):
            s.token_embeddings([7])


@pytest.fixture(scope='module')
def gguf_head32(tmp_path_factory, tiny_tokenizer_dir):
    """The tiny LLaMA with 2 heads of 32: a q8_0 KV cache needs head sizes divisible by its block (32)."""
    from anomalygpt_edge.export.llm_export import export_llm
    from anomalygpt_edge.models.anomalygpt import AnomalyGPT
    from anomalygpt_edge.models.config import get_config
    from anomalygpt_edge.models.tokenizer import vocab_size
    cfg = get_config('tiny', vocab=vocab_size(tiny_tokenizer_dir), heads=2)
    out = tmp_path_factory.mktemp('gguf_h32')
    export_llm(AnomalyGPT.random(cfg, seed=0).llama_model, tiny_tokenizer_dir, out, quants=('f32',))
    return out / 'llm-f32.gguf'


def test_q8_0_kv_cache_is_smaller_and_keeps_the_logits(gguf_head32, prompt):
    ids, embeds = prompt
    got = {}
    for kv in ('f32', 'f16', 'q8_0'):
        with LlamaSession(gguf_head32, n_ctx=256, kv_type=kv, flash_attn=kv != 'f32') as s:
            assert s.kv_type == kv
            logits = run(s, ids, embeds)
            state = s._L.llama_state_get_size(s._ctx)  # the KV cache of the positions used, serialised
            got[kv] = (logits, state, s.generate(12, stop=())[0])
    ref, ref_state, ref_ids = got['f32']
    scale = float(np.abs(ref).max())
    assert scale > 0.1
    for kv in ('f16', 'q8_0'):
        logits, state, gen = got[kv]
        assert np.abs(logits - ref).max() <= 5e-3 * scale and gen == ref_ids  # F16 + flash attention: ~2e-3
    assert got['q8_0'][1] < 0.7 * got['f16'][1] < 0.7 * ref_state  # 34 bytes per 32 values vs 64 vs 128
    assert not np.array_equal(got['q8_0'][0], got['f16'][0])      # the type really changed


def test_bad_kv_cache_settings_are_refused(tiny_gguf_f32):
    with pytest.raises(LlamaError, match='unknown KV cache type'):
        LlamaSession(tiny_gguf_f32, n_ctx=256, kv_type='q5_9')
    with pytest.raises(LlamaError, match='needs flash attention'):
        LlamaSession(tiny_gguf_f32, n_ctx=256, kv_type='q8_0', flash_attn=False)
    with pytest.raises(LlamaError, match='contradicts'):
        LlamaSession(tiny_gguf_f32, n_ctx=256, kv_type='q8_0', exact=True)
    with pytest.raises(LlamaError, match='head size divisible by 32'):  # the tiny model's heads are 16 wide
        LlamaSession(tiny_gguf_f32, n_ctx=256, kv_type='q8_0')
