import json
import os
import sys

import pytest
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plan
from model import PRESETS, Llama, config_from_preset


def rule(result, name):
    return next(r for r in result['token_rules'] if r['rule'].startswith(name))


def test_chinchilla_rule_is_20_tokens_per_parameter():
    result = plan.main(['--params=1e8'])
    assert rule(result, 'Chinchilla')['tokens'] == 2e9
    assert plan.params_supported(2e9) == 1e8


def test_ttl_160m_has_the_model_cards_parameter_count():
    assert plan.model_facts(PRESETS['ttl-160m'])['params'] == 162_417_408


def test_ttl_460m_has_the_model_cards_parameter_count():
    assert plan.model_facts(PRESETS['ttl-460m'])['params'] == 468_239_360


def test_ttl_160m_trained_its_model_cards_tokens_about_23_per_parameter():
    result = plan.main(['--model=ttl-160m'])
    row = rule(result, 'as TeenyTinyLlama-160m')
    assert row['tokens'] == pytest.approx(457_969 * 8192)  # steps x 4 sequences x 2048 tokens, about 3.75B
    assert 23.0 < row['tokens_per_param'] < 23.2


def test_ttl_corpus_is_38_tokens_per_parameter_of_ttl_160m_and_supports_310m_at_20x(tmp_path):
    (tmp_path / 'meta.json').write_text(json.dumps({'vocab_size': 32000,
                                                    'splits': {'train': {'tokens': plan.TTL_CORPUS_TOKENS}}}))
    result = plan.main(['--model=ttl-160m', f'--data_dir={tmp_path}'])
    assert plan.TTL_CORPUS_TOKENS / result['params'] == pytest.approx(38.17, abs=0.01)
    assert result['corpus']['params_supported_at_20x'] == pytest.approx(310e6)
    assert result['corpus']['epochs']['as TeenyTinyLlama-160m'] == pytest.approx(0.605, abs=0.001)


@pytest.mark.parametrize('name', ['tiny', 'demo'])
@pytest.mark.parametrize('tied', [True, False])
def test_counts_from_the_shape_equal_the_models_own(name, tied):
    config = config_from_preset(name, tie_embeddings=tied)
    model = Llama(config)
    facts = plan.model_facts(asdict(config), context=32)
    assert facts['params'] == model.num_params(non_embedding=False)
    assert facts['non_embedding'] == model.num_params(non_embedding=True)
    assert facts['flops_per_token'] == model.flops_per_token(32)


def test_time_from_peak_flops_is_flops_over_peak_times_mfu_times_gpus():
    result = plan.main(['--model=ttl-160m', '--tokens=1e9', '--gpu=H100', '--mfu=0.5', '--num_gpus=2'])
    row = rule(result, 'planned')
    [hours] = row['hours'].values()
    assert hours == pytest.approx(1e9 * result['flops_per_token'] / (989e12 * 0.5 * 2) / 3600)


def test_time_and_cost_from_measured_tokens_per_second():
    result = plan.main(['--params=1e6', '--tokens=3.6e7', '--tokens_per_sec=1e4', '--gpu_hour_price=2.5',
                        '--num_gpus=4'])
    row = rule(result, 'planned')
    assert row['hours'] == {'measured': 1.0} and row['cost'] == {'measured': 10.0}


def test_corpus_tokens_say_which_model_size_they_support(tmp_path):
    (tmp_path / 'meta.json').write_text(json.dumps({'vocab_size': 512, 'splits': {'train': {'tokens': 1_000_000}}}))
    result = plan.main(['--model=tiny', f'--data_dir={tmp_path}'])
    assert result['corpus']['params_supported_at_20x'] == 50_000


def test_config_file_gives_shape_token_budget_and_corpus_as_train_py_reads_it(tmp_path):
    (tmp_path / 'meta.json').write_text(json.dumps({'vocab_size': 300, 'splits': {'train': {'tokens': 123_456}}}))
    path = tmp_path / 'x.py'
    path.write_text(f"model = 'tiny'\nn_layer = 3\nmax_iters = 100\nbatch_size = 4\nblock_size = 32\n"
                    f"gradient_accumulation_steps = 2\ndata_dir = {str(tmp_path)!r}\n")
    result = plan.main([str(path)])
    # the data's vocab (300) replaces the preset's, as in a scratch training run
    assert result['params'] == plan.model_facts({**PRESETS['tiny'], 'n_layer': 3, 'vocab_size': 300,
                                                 'block_size': 32})['params']
    assert rule(result, 'this config')['tokens'] == 100 * 4 * 32 * 2
    assert result['corpus']['train_tokens'] == 123_456


def test_train_py_options_override_the_preset():
    result = plan.main(['--model=ttl-160m', '--n_layer=6'])
    assert result['params'] == plan.model_facts({**PRESETS['ttl-160m'], 'n_layer': 6})['params']


def test_unknown_option_is_an_error_naming_the_closest():
    with pytest.raises(SystemExit, match='max_iters'):
        plan.main(['--model=tiny', '--max_iter=10'])


def test_tokens_per_sec_is_read_from_a_log(tmp_path):
    lines = [{'step': i, 'tokens': 1000 * i, 'tokens_per_sec': rate} for i, rate in enumerate([50, 900, 1000, 1100])]
    (tmp_path / 'log.jsonl').write_text('\n'.join(json.dumps(r) for r in lines) + '\n')
    assert plan.tokens_per_sec_from_log(str(tmp_path)) == 1000  # median without the warm-up line


def test_tokens_per_sec_from_tokens_and_time_when_the_log_has_no_rate(tmp_path):
    lines = [{'step': i, 'tokens': 500 * i, 'time': 0.5 * i} for i in range(5)]
    (tmp_path / 'log.jsonl').write_text('\n'.join(json.dumps(r) for r in lines) + '\n')
    assert plan.tokens_per_sec_from_log(str(tmp_path / 'log.jsonl')) == pytest.approx(1000)


def test_unknown_gpu_is_an_error_naming_the_known_ones():
    with pytest.raises(SystemExit, match='A100'):
        plan.main(['--model=tiny', '--gpu=A10O'])


def test_without_a_model_it_plans_train_py_default_model():
    from mirim.train_config import DEFAULTS as TRAIN_DEFAULTS
    result = plan.main([])
    assert result['model'] == TRAIN_DEFAULTS['model']


# --------------------------------------------------------------------------- plot.py

import plot  # noqa: E402


def write_log(out_dir, records):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'log.jsonl'), 'w') as f:
        f.write('\n'.join(json.dumps(r) for r in records) + '\n')


def test_plot_writes_a_png_from_two_logs(tmp_path):
    pytest.importorskip('matplotlib')
    write_log(tmp_path / 'a', [{'step': s, 'tokens': 1000 * s, 'train_loss': 5 - s / 10, 'lr': 1e-3,
                                'val_loss': 5.2 - s / 10, 'val_bpb': 2 - s / 50} for s in range(0, 20, 5)])
    write_log(tmp_path / 'b', [{'step': s, 'tokens': 2000 * s, 'train_loss': 5 - s / 8} for s in range(10)])  # no val, no lr
    output = plot.main([str(tmp_path / 'a'), str(tmp_path / 'b' / 'log.jsonl'), f'--output={tmp_path / "runs.png"}'])
    with open(output, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_resumed_run_counts_repeated_steps_once_keeping_the_later_lines(tmp_path):
    write_log(tmp_path, [{'step': 0, 'train_loss': 9}, {'step': 10, 'train_loss': 8}, {'step': 20, 'train_loss': 7},
                         {'step': 10, 'train_loss': 6}, {'step': 20, 'train_loss': 5}])
    records = plot.read_log(str(tmp_path))
    assert [(r['step'], r['train_loss']) for r in records] == [(0, 9), (10, 6), (20, 5)]


def test_series_skips_lines_without_the_key():
    records = [{'tokens': 1, 'val_loss': 3.0}, {'tokens': 2}, {'tokens': 3, 'val_loss': float('nan')},
               {'tokens': 4, 'val_loss': 2.0}]
    assert plot.series(records, 'tokens', 'val_loss') == ([1, 4], [3.0, 2.0])


def test_minutes_on_the_x_axis_are_the_runs_elapsed_seconds_over_60():
    records = [{'step': 0, 'elapsed': 6.0, 'val_bpb': 3.0}, {'step': 10, 'val_bpb': 2.5},
               {'step': 20, 'elapsed': 120.0, 'val_bpb': 2.0}]
    assert plot.series(records, 'minutes', 'val_bpb') == ([0.1, 2.0], [3.0, 2.0])
    with pytest.raises(SystemExit, match='choose tokens, step or minutes'):
        plot.main(['out/a', '--x=seconds'])


def test_plot_of_a_missing_run_names_the_file(tmp_path):
    with pytest.raises(SystemExit, match='log.jsonl not found'):
        plot.read_log(str(tmp_path / 'nowhere'))


@pytest.mark.parametrize('setting', ['--what=nope', '--repeats=0', '--dtype=float16'])
def test_bench_refuses_bad_settings_in_one_line(setting):
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, 'bench.py', setting], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.startswith('bench.py: error: ') and 'Traceback' not in done.stderr


def test_depth_dial_shapes_are_valid_for_depths_2_to_24():
    from model import Llama, LlamaConfig, depth_shape
    for depth in range(2, 25):
        shape = depth_shape(depth)
        config = LlamaConfig(vocab_size=4096, **shape)  # raises on an invalid shape
        assert (config.n_layer, config.n_embd, config.head_size) == (depth, 64 * depth, 64)
        assert config.n_head % config.n_kv_head == 0 and config.ffn_hidden % 64 == 0
        assert config.ffn_hidden >= 8 * config.n_embd / 3
    small = Llama(LlamaConfig(vocab_size=4096, **depth_shape(2)))
    assert plan.count_params({**depth_shape(2), 'vocab_size': 4096})['params'] == small.num_params(non_embedding=False)


def test_plan_prints_the_depth_table_for_model_auto(tmp_path, capsys):
    from test_train import make_corpus
    data = make_corpus(tmp_path)
    result = plan.main(['--model=auto', '--depth=3', f'--data_dir={data}'])
    out = capsys.readouterr().out
    rows = result['depth_table']
    assert [r['depth'] for r in rows] == list(range(2, 25))
    assert all(r['max_iters'] * r['batch_tokens'] >= r['tokens'] for r in rows)
    assert all(r['batch_tokens'] & (r['batch_tokens'] - 1) == 0 and r['batch_tokens'] <= 2 ** 19 for r in rows)
    assert 'depth dial: depth 3' in out and "model='auto'" in out
    assert len([line for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]) >= 23


def test_bench_gguf_runs_and_the_f32_file_scores_mirims_bits_per_byte(tmp_path):
    import subprocess
    import torch
    from model import LlamaConfig
    from test_train import make_corpus
    from mirim.tokenizer import load_tokenizer
    pytest.importorskip('llama_cpp', reason="llama-cpp-python is not installed (it builds llama.cpp from source)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tok = load_tokenizer('bytes')
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=64,
                              ffn_hidden=96, activation='gelu_tanh', tie_embeddings=True), seed=0)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(20.0)  # logits far from uniform, so that a wrong score shows
    torch.save({'model': model.state_dict(), 'model_config': asdict(model.config), 'tokenizer': tok.to_dict()},
               tmp_path / 'ckpt.pt')
    os.makedirs(tmp_path / 'data')
    data = make_corpus(tmp_path / 'data')
    done = subprocess.run([sys.executable, 'bench.py', '--what=gguf', f'--out_dir={tmp_path / "ckpt.pt"}',
                           f'--data_dir={data}', '--gguf_types=f32,q4_0', '--repeats=1', '--prompt_tokens=4',
                           '--new_tokens=8', '--threads=1'], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {line[:18].strip(): line[18:].split() for line in done.stdout.splitlines()
            if line.startswith(('mirim', 'llama.cpp'))}
    assert list(rows) == ['mirim fp32', 'llama.cpp f32', 'llama.cpp q4_0']
    mirim_bpb, f32_bpb = float(rows['mirim fp32'][3]), float(rows['llama.cpp f32'][3])
    assert mirim_bpb > 1 and abs(f32_bpb - mirim_bpb) < 1e-3  # the same windows, the same function
    assert rows['llama.cpp f32'][4] == '8/8'
