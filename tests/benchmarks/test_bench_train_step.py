"""The stage-1 step benchmark times every variant it is asked for and names bad arguments."""
import pytest

from anomalygpt_edge.benchmarks import bench_train_step


def test_every_variant_is_timed_against_the_first():
    report = bench_train_step.run(('tiny', 'small-p16', 'tiny+frozen_text+probe_weight=0.5'), steps=2, rounds=2,
                                  warmup=1, threads=1, batch=2, progress=False)
    rows = report['variants']
    assert [r['config'] for r in rows] == ['tiny', 'small-p16', 'tiny']
    assert rows[2]['settings'] == {'frozen_text': True, 'probe_weight': 0.5}
    assert all(r['step_ms']['n'] == 4 and r['step_ms']['median'] > 0 for r in rows)   # 2 rounds x 2 steps
    assert rows[0]['speedup_vs_first'] == 1.0
    assert rows[1]['speedup_vs_first'] == round(rows[0]['step_ms']['median'] / rows[1]['step_ms']['median'], 3)
    assert report['machine']['cores_logical'] >= 1


@pytest.mark.parametrize('flag', [['--variants', 'nano'], ['--variants', 'small+no_such_setting'],
                                  ['--variants', 'small+probe_weight=lots'], ['--variants', 'small+frozen_text=2'],
                                  ['--variants', 'small+probe_weight=-1'], ['--steps', '0']])
def test_bad_arguments_are_usage_errors(flag, capsys):
    with pytest.raises(SystemExit) as e:
        bench_train_step.main(flag)
    assert e.value.code == 2 and flag[0] in capsys.readouterr().err


def test_with_loader_times_steps_fed_by_the_training_loader(monkeypatch):
    from anomalygpt_edge.models import train
    calls = []
    real = train._batches

    def spy(ds, batch, seed, start=0, workers=1):
        calls.append(workers)
        return real(ds, batch, seed, start, workers=workers)
    monkeypatch.setattr(train, '_batches', spy)
    report = bench_train_step.run(('tiny',), steps=2, rounds=1, warmup=0, threads=1, batch=2, progress=False,
                                  with_loader=True)
    assert calls == [1]          # one live loader with a worker process, no pre-simulated batches
    assert 'loader' in report['benchmark'] and report['variants'][0]['step_ms']['n'] == 2
