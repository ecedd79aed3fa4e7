"""Writing a latency report: JSON, a Markdown summary and a PNG chart, each written atomically."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def _atomic_write(path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class OutputError(ValueError):
    """An output path that a long run could not write at its end; the message names the option and the path."""
    exit_code = 2  # bad input (cli.exit_code)


def check_output(path, option: str) -> Path:
    """Refuses, before the work, an output file that names a folder or whose folder cannot be made or written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path}: a folder, not a file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{option} {path}: its folder cannot be made ({e.strerror or e})") from None
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"{option} {path}: its folder is not writable")
    return path


def _clean(o):
    """JSON has no inf/NaN and only string keys."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return o


def save_report(report: dict, json_path, md: str, md_path=None) -> None:
    """The finished report: JSON (and Markdown, if asked) written atomically, the Markdown printed."""
    write_json(json_path, report)
    if md_path:
        write_text(md_path, md + '\n')
    print(md)


def write_json(path, report: dict) -> Path:
    text = json.dumps(_clean(report), indent=1)
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text + '\n', encoding='utf-8'))


def write_text(path, text: str) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))


def _ms(v) -> str:
    if v is None:
        return '–'
    return f'{v / 1e3:.2f} s' if v >= 1000 else f'{v:.1f} ms' if v >= 10 else f'{v:.2f} ms'


def markdown(report: dict) -> str:
    m = report['machine']
    lines = [f"## Latency, `{report['config']}` config — {m['cpu']}, {m['cores_logical']} cores, "
             f"{m['memory_gb']} GB, {report['options']['threads']} threads",
             '', f"`{report['command']}`" if report.get('command') else '', '',
             f"{report['created']}; {report['options']['runs']} runs after {report['options']['warmup']} warm-up; "
             'medians unless stated; speed-up = baseline / ours (> 1: ours faster).', '']
    vis = report.get('vision')
    if vis:
        cols = list(vis['ours']) + list(vis['baseline'])
        runs = {**vis['ours'], **vis['baseline']}
        lines += ['### Vision (frame ' + 'x'.join(map(str, vis['frame'])) + ')', '',
                  '| stage | ' + ' | '.join(f'{c} median (p90)' for c in cols) + ' |',
                  '|---|' + '---|' * len(cols)]
        for s in ('preprocess', 'encoder', 'decoder', 'prompt_learner', 'chain', 'fewshot'):
            cells = [f"{_ms(runs[c]['stages_ms'][s]['median'])} ({_ms(runs[c]['stages_ms'][s]['p90'])})" for c in cols]
            lines.append(f'| {s} | ' + ' | '.join(cells) + ' |')
        lines.append('| peak RSS added by load / run | ' + ' | '.join(
            f"{runs[c]['rss_mb']['load']['delta_peak']:.0f} / {runs[c]['rss_mb']['run']['delta_peak']:.0f} MiB"
            for c in cols) + ' |')
        lines.append('')
    llm = report.get('llm')
    if llm:
        t = llm['target_layers']
        ext = any(v.get('at_target', {}).get('extrapolated') for g in ('ours', 'baseline') for v in llm[g].values())
        lines += [f"### LLM at {t} layers" + (f" (EXTRAPOLATED from {llm['layers_measured']} layers, t = a + b·layers)"
                                              if ext else ''), '',
                  f"Prompt: {llm['prompt']['positions']} positions; answer {llm['answer_tokens']} tokens; "
                  f"verdict after {llm['verdict_steps']} decode steps.", '',
                  '| runner | prefill | time to verdict (LLM) | whole answer (LLM) | decode tok/s | ceiling tok/s | of ceiling |',
                  '|---|---|---|---|---|---|---|']
        ceil = report.get('ceiling', {})
        for group, label in (('ours', 'LlamaSession'), ('raw_llama_cpp', 'raw llama.cpp'), ('baseline', 'HF')):
            for name, v in llm[group].items():
                a = v.get('at_target')
                if not a:
                    continue
                if a.get('invalid'):
                    lines.append(f"| {label} {name} | {a['invalid']} | | | | | |")
                    continue
                c = ceil.get(name, {}).get('at_target') if group != 'baseline' else None
                lines.append(f"| {label} {name} | {_ms(a['prefill_ms']['value'])} | {_ms(a['verdict_ms']['value'])} | "
                             f"{_ms(a['answer_ms']['value'])} | {a['decode_tok_s']:.2f} | "
                             f"{c['ceiling_tok_s']:.2f} | {c['fraction']:.0%} |" if c else
                             f"| {label} {name} | {_ms(a['prefill_ms']['value'])} | {_ms(a['verdict_ms']['value'])} | "
                             f"{_ms(a['answer_ms']['value'])} | {a['decode_tok_s']:.2f} | – | – |")
        if ceil:
            lines += ['', f"Memory bandwidth measured in this run: {ceil['bandwidth_gb_s']:.1f} GB/s "
                          f"(best of the run's readings; {report['bandwidth']['start']['method']}); bytes per token = {ceil['bytes_definition']}."]
        lines.append('')
    if report.get('chain'):
        lines += ['### Whole chain (vision measured end to end + LLM at the target depth)', '',
                  '| pipeline | vision chain | time to verdict | whole answer |', '|---|---|---|---|']
        for name, c in report['chain'].items():
            lines.append(f"| {name} | {_ms(c['vision_chain_ms'])} | {_ms(c['time_to_verdict_ms'])} | {_ms(c['answer_ms'])} |")
        lines.append('')
    if report.get('targets'):
        lines += ['### Targets', '', '| target | against | measured | met |', '|---|---|---|---|']
        for t in report['targets']:
            val = f"{t['measured']:.0%}" if t['threshold'] < 1 else f"{t['measured']:.2f}x"
            lines.append(f"| {t['what']} | {t['against']} | {val} | {'met' if t['met'] else 'MISSED'} |")
        lines.append('')
    return '\n'.join(lines)


def plot(report: dict, path) -> Path:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    ax = axes[0]
    chains = report.get('chain') or {}
    names = list(chains)
    parts = ('preprocess', 'encoder', 'decoder', 'prompt_learner', 'llm_prefill')
    left = [0.0] * len(names)
    for p in parts:
        vals = [chains[n]['stages_ms'][p] / 1e3 for n in names]
        ax.barh(names, vals, left=left, label=p)
        left = [a + b for a, b in zip(left, vals)]
    verdict = [(chains[n]['time_to_verdict_ms'] - chains[n]['vision_chain_ms'] - chains[n]['stages_ms']['llm_prefill']) / 1e3
               for n in names]
    ax.barh(names, verdict, left=left, label='decode to verdict')
    ax.set_xlabel('seconds (time to verdict)')
    ext = any(c['llm_extrapolated'] for c in chains.values())
    ax.set_title('time to verdict by stage' + (' (LLM extrapolated)' if ext else ''))
    ax.legend(fontsize=8)
    ax = axes[1]
    labels, values = [], []
    llm = report.get('llm') or {}
    for group, label in (('ours', 'session'), ('raw_llama_cpp', 'raw'), ('baseline', '')):
        for name, v in llm.get(group, {}).items():
            if v.get('at_target', {}).get('decode_tok_s'):
                labels.append(f'{label} {name}'.strip())
                values.append(v['at_target']['decode_tok_s'])
    ax.bar(labels, values, color='tab:blue')
    for q, c in (report.get('ceiling') or {}).items():
        if isinstance(c, dict) and 'at_target' in c:
            ax.axhline(c['at_target']['ceiling_tok_s'], ls='--', lw=1, color='tab:red')
            ax.text(len(labels) - 0.5, c['at_target']['ceiling_tok_s'], f'ceiling {q}', fontsize=7, ha='right', va='bottom')
    ax.set_ylabel('decode tokens/s')
    ax.set_title(f"decode at {llm.get('target_layers', '?')} layers vs bandwidth ceiling")
    ax.tick_params(axis='x', rotation=30, labelsize=8)
    m = report['machine']
    fig.suptitle(f"{report['config']} config, {m['cpu']}, {report['options']['threads']} threads")
    fig.tight_layout()

    def save(tmp):
        fig.savefig(tmp, dpi=110, format='png')
    try:
        return _atomic_write(path, save)
    finally:
        plt.close(fig)
