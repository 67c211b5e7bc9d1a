"""train.py on a tiny synthetic corpus (bytes tokenizer) and a tiny model: a few steps each.
Most runs call train.main() in this process (no second torch import); the ones about processes,
signals and crashes run train.py in a subprocess."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from mirim import run as run_skeleton, train_config  # noqa: E402
from mirim.optim import get_lr  # noqa: E402
from mirim.shards import write_meta, write_shard  # noqa: E402
from mirim.tokenizer import load_tokenizer  # noqa: E402

TINY = ['--model=tiny', '--device=cpu', '--dtype=float32', '--batch_size=4', '--block_size=32', '--eval_iters=2',
        '--warmup_iters=2', '--learning_rate=3e-3', '--log_interval=1']


def make_corpus(root, seed=0):
    """Sentences from a small grammar, as bytes: easy to learn, so a few steps lower the loss."""
    rng = random.Random(seed)
    words = [['o gato', 'a menina', 'o rei', 'um homem', 'o povo'], ['come', 've', 'ama', 'fala com', 'guarda'],
             ['o peixe', 'a terra', 'o senhor', 'as aguas', 'a luz']]
    tok = load_tokenizer('bytes')
    meta = {'tokenizer': {'kind': 'bytes'}, 'vocab_size': tok.vocab_size, 'bos_id': tok.bos_id,
            'eos_id': tok.eos_id, 'pad_id': tok.pad_id, 'splits': {}}
    for split, n in (('train', 300), ('val', 30)):
        docs = [' '.join(' '.join(rng.choice(w) for w in words) + '.' for _ in range(rng.randint(2, 6)))
                for _ in range(n)]
        ids = [i for d in docs for i in tok.encode(d, bos=True, eos=True)]
        write_shard(os.path.join(root, f'{split}_000000.bin'), ids, tok.vocab_size)
        meta['splits'][split] = {'tokens': len(ids), 'bytes': sum(len(d.encode()) for d in docs),
                                 'documents': n, 'shards': [f'{split}_000000.bin']}
    write_meta(root, meta)
    return str(root)


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp('corpus'))


def run(data_dir, out_dir, *args):
    train.main(TINY + [f'--data_dir={data_dir}', f'--out_dir={out_dir}', *args])


def train_py(data_dir, out_dir, *args, torchrun=0, env=None, script=None, **popen):
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}'] \
        if torchrun else [sys.executable]
    command = launcher + [script or os.path.join(ROOT, 'train.py')] + TINY + [f'--data_dir={data_dir}', f'--out_dir={out_dir}',
                                                                   *args]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def log_lines(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return [(r['step'], r['train_loss']) for r in log_lines(out_dir) if r['train_loss'] is not None]


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def wait_for(condition, timeout=60, process=None):
    deadline = time.time() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"train.py ended early:\n{process.stdout.read()}")
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def error_of(data_dir, out_dir, *args):
    with pytest.raises(SystemExit) as e:
        run(data_dir, out_dir, *args)
    return str(e.value.code)


# --- training

def test_loss_falls_over_a_few_steps(data_dir, tmp_path):
    run(data_dir, tmp_path, '--max_iters=12', '--eval_interval=12')
    losses = [loss for _, loss in train_losses(tmp_path)]
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0


def test_checkpoint_loads_with_model_load_model(data_dir, tmp_path):
    from mirim.checkpoint import load_model
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2')
    model, tokenizer, checkpoint = load_model(str(tmp_path))
    assert checkpoint['step'] == 2 and tokenizer.kind == 'bytes'
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in checkpoint['model'])


def test_resume_is_exact(data_dir, tmp_path):
    # dropout on, so the restored random state matters too
    common = ['--dropout=0.1', '--eval_interval=100', '--lr_decay_iters=8']
    run(data_dir, tmp_path / 'straight', '--max_iters=8', *common)
    run(data_dir, tmp_path / 'split', '--max_iters=4', *common)
    run(data_dir, tmp_path / 'split', '--max_iters=8', '--init_from=resume', *common)
    assert train_losses(tmp_path / 'split') == train_losses(tmp_path / 'straight')


def test_compile_auto_times_two_passes_and_leaves_the_run_as_it_was(data_dir, tmp_path, capsys):
    # dropout on: the timing passes must not move the random state (nor leave gradients behind)
    common = ['--dropout=0.1', '--eval_interval=100', '--max_iters=4']
    run(data_dir, tmp_path / 'eager', *common)
    run(data_dir, tmp_path / 'auto', '--compile=auto', *common)
    out = capsys.readouterr().out
    assert "compile='auto': 4 forward + backward passes left at" in out and "under 10 -> compile off" in out
    assert train_losses(tmp_path / 'auto') == train_losses(tmp_path / 'eager')


def test_compile_auto_compiles_when_the_eager_passes_left_take_over_ten_minutes(monkeypatch):
    monkeypatch.setattr(run_skeleton, 'eager_step_seconds', lambda run, c: 2.0)
    c = SimpleNamespace(compile='auto', max_iters=1000, gradient_accumulation_steps=4)
    run = SimpleNamespace(step=700, world_size=2)
    assert run_skeleton.compile_wanted(run, c)  # 300 steps x 2 micro-batches x 2 s = 20 min
    run.step = 900
    assert not run_skeleton.compile_wanted(run, c)  # 100 x 2 x 2 s = 6.7 min
    monkeypatch.setattr(run_skeleton, 'eager_step_seconds', lambda run, c: 1 / 0)  # True and False are not timed
    assert run_skeleton.compile_wanted(run, SimpleNamespace(**{**vars(c), "compile": True}))
    assert not run_skeleton.compile_wanted(run, SimpleNamespace(**{**vars(c), "compile": False}))


def test_compile_takes_true_false_or_auto(data_dir, tmp_path):
    assert "--compile=maybe: choose False, True or auto" in error_of(data_dir, tmp_path, '--compile=maybe')
    config = tmp_path / 'c.py'
    config.write_text("compile = 'sometimes'\n")
    assert "compile = 'sometimes': choose False, True or auto" in error_of(data_dir, tmp_path, str(config))
    config.write_text("compile = 'auto'\n")
    run(data_dir, tmp_path / 'out', str(config), '--max_iters=1', '--eval_interval=1')


def test_muon_ns_steps_is_the_sessions_setting(data_dir, tmp_path, monkeypatch):
    from mirim import optim
    seen = []
    orthogonalize = optim.orthogonalize
    monkeypatch.setattr(optim, 'orthogonalize', lambda g, steps=5, **kw: seen.append(steps) or orthogonalize(g, steps, **kw))
    common = ['--optimizer=muon', '--eval_interval=100', '--max_iters=2']
    run(data_dir, tmp_path, '--muon_ns_steps=3', *common)
    assert seen and set(seen) == {3}
    seen.clear()
    run(data_dir, tmp_path, '--init_from=resume', '--muon_ns_steps=4', '--optimizer=muon', '--max_iters=3')
    assert seen and set(seen) == {4}  # not saved with the optimizer's state: a resume takes its own
    assert error_of(data_dir, tmp_path / 'zero', '--muon_ns_steps=0', *common).endswith('muon_ns_steps must be at least 1')


def test_muon_ns_dtype_chooses_newton_schulz_s_dtype(data_dir, tmp_path):
    for dtype in ('float32', 'bfloat16'):
        run(data_dir, tmp_path / dtype, '--optimizer=muon', f'--muon_ns_dtype={dtype}', '--max_iters=1')
        groups = load(tmp_path / dtype / 'ckpt.pt')['optimizer']['param_groups']
        assert [g['ns_dtype'] for g in groups if g['use_muon']] == [dtype]
    assert "muon_ns_dtype must be 'auto', 'float32' or 'bfloat16'" in error_of(data_dir, tmp_path / 'x', '--muon_ns_dtype=fp8')


def test_zero_residual_starts_the_residual_projections_at_zero_and_keeps_the_rest(data_dir, tmp_path):
    from model import Llama, LlamaConfig
    config = LlamaConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=16)
    plain, zero = Llama(config, seed=3), Llama(config, seed=3, zero_residual=True)
    for (name, a), b in zip(plain.state_dict().items(), zero.state_dict().values()):
        if name.endswith(('wo.weight', 'w2.weight')):
            assert a.abs().max() > 0 and b.abs().max() == 0
        else:
            assert torch.equal(a, b), name
    run(data_dir, tmp_path, '--zero_residual=True', '--max_iters=3', '--eval_interval=3')
    weights = load(tmp_path / 'ckpt.pt')['model']
    assert all(weights[k].abs().max() > 0 for k in weights if k.endswith(('wo.weight', 'w2.weight')))
    assert train_losses(tmp_path)[-1][1] < train_losses(tmp_path)[0][1]
    assert 'zero_residual=True zeroes a scratch model' in error_of(data_dir, tmp_path / 'ft', '--zero_residual=True',
                                                                    f'--init_from={tmp_path}/ckpt.pt')


def test_two_processes_match_one_with_twice_the_accumulation(data_dir, tmp_path):
    args = ['--max_iters=4', '--eval_interval=100', '--gradient_accumulation_steps=2']
    process = train_py(data_dir, tmp_path / 'ddp', *args, torchrun=2)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    run(data_dir, tmp_path / 'one', *args)  # on one thread, as each torchrun process
    one, ddp = train_losses(tmp_path / 'one'), train_losses(tmp_path / 'ddp')
    assert [s for s, _ in ddp] == [1, 2, 3, 4]
    assert torch.allclose(torch.tensor([l for _, l in ddp]), torch.tensor([l for _, l in one]), rtol=1e-5, atol=0)
    # only rank 0 writes: one set of files, one log line per step, one config printout
    assert sorted(os.listdir(tmp_path / 'ddp')) == ['best.pt', 'ckpt.pt', 'config.json', 'log.jsonl']
    assert output.count('config:') == 1
    assert 'Warning' not in output  # nothing printed once per rank


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
    process = train_py(data_dir, tmp_path, '--max_iters=100000', '--eval_interval=100000')
    log = tmp_path / 'log.jsonl'
    wait_for(lambda: log.exists() and log.read_text().count('\n') >= 3, process=process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
    assert 'stopped by SIGTERM' in output
    assert load(tmp_path / 'ckpt.pt')['step'] >= 2


# train.py with torch.save slowed down: it sleeps inside every checkpoint write, after the temp file is written
SLOW_SAVE = """import sys, time
sys.path.insert(0, {root!r})
import torch
import train
save = torch.save
def slow_save(obj, f, *args, **kwargs):
    save(obj, f, *args, **kwargs)
    f.flush()
    time.sleep(1)
torch.save = slow_save
train.main(sys.argv[1:])
"""


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(data_dir, tmp_path):
    script = tmp_path / 'slow_save.py'
    script.write_text(SLOW_SAVE.format(root=ROOT))
    out = tmp_path / 'out'
    process = train_py(data_dir, out, '--max_iters=100000', '--eval_interval=2', script=str(script))
    ckpt = out / 'ckpt.pt'
    writing = lambda: any(p.name.startswith('ckpt.pt.tmp') for p in out.iterdir())  # noqa: E731
    wait_for(lambda: ckpt.exists() and writing(), process=process)  # the second save is under way
    process.kill()
    process.communicate(timeout=60)
    assert load(ckpt)['step'] == 2


def test_nan_loss_stops_without_overwriting_the_last_checkpoint(data_dir, tmp_path):
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2')
    before = hashlib.sha256((tmp_path / 'ckpt.pt').read_bytes()).hexdigest()
    message = error_of(data_dir, tmp_path, '--init_from=resume', '--max_iters=12', '--eval_interval=100',
                       '--learning_rate=1e12', '--warmup_iters=0', '--grad_clip=0.0')
    assert 'at step' in message and ('nan' in message or 'inf' in message)
    assert hashlib.sha256((tmp_path / 'ckpt.pt').read_bytes()).hexdigest() == before


def test_fine_tuning_starts_from_the_checkpoints_weights(data_dir, tmp_path):
    run(data_dir, tmp_path / 'base', '--max_iters=4', '--eval_interval=4')
    run(data_dir, tmp_path / 'tuned', '--max_iters=1', f'--init_from={tmp_path / "base"}')
    base_val = load(tmp_path / 'base' / 'ckpt.pt')['val_loss']
    assert log_lines(tmp_path / 'tuned')[0]['val_loss'] == pytest.approx(base_val, rel=1e-6)


def test_fine_tuning_from_a_hugging_face_folder_starts_from_its_weights(data_dir, tmp_path):
    import export
    run(data_dir, tmp_path / 'base', '--max_iters=4', '--eval_interval=4')
    export.export(str(tmp_path / 'base'), str(tmp_path / 'hf'), check_tokenizer=False)
    run(data_dir, tmp_path / 'tuned', '--max_iters=1', f'--init_from={tmp_path / "hf"}')
    base_val = load(tmp_path / 'base' / 'ckpt.pt')['val_loss']
    assert log_lines(tmp_path / 'tuned')[0]['val_loss'] == pytest.approx(base_val, rel=1e-6)


def retokenized_copy(data_dir, dest):
    """The same shards under a meta.json naming another tokenizer of the same vocab size."""
    import shutil
    other = shutil.copytree(data_dir, dest)
    meta = json.loads((other / 'meta.json').read_text())
    meta['tokenizer'] = {'kind': 'bytes', 'vocab_size': 261, 'special_tokens': {
        '<s>': 256, '</s>': 257, '<pad>': 258, '<|user|>': 259, '<|end|>': 260}}  # same size, other tokens
    write_meta(str(other), meta)
    return other


def test_fine_tuning_on_data_from_another_tokenizer_is_refused(data_dir, tmp_path):
    run(data_dir, tmp_path / 'base', '--max_iters=1', '--eval_interval=1')
    other = retokenized_copy(data_dir, tmp_path / 'other')
    message = error_of(other, tmp_path / 'tuned', f'--init_from={tmp_path / "base"}')
    assert 'another tokenizer' in message and 'raw bytes' in message and '--tokenizer bytes' in message


def test_the_tokenizer_error_names_the_models_tokenizer_file():
    from mirim.init_from import tokenizer_spec_hint
    assert tokenizer_spec_hint({'kind': 'tokenizers', 'vocab_size': 4096}, 'data/x') == \
        ('a tokenizer.json of 4,096 pieces', os.path.join('data/x', 'tokenizer.json'))
    assert tokenizer_spec_hint({'kind': 'sentencepiece'}, 'data/x')[1] == os.path.join('data/x', 'tokenizer.model')
    assert tokenizer_spec_hint({'kind': 'tiktoken', 'name': 'gpt2'})[1] == 'tiktoken:gpt2'
    assert tokenizer_spec_hint({'kind': 'tokenizers'})[1] == "<the model's data dir>/tokenizer.json"


def test_lr_schedules_warm_up_then_end_at_min_lr():
    cfg = dict(train_config.DEFAULTS, learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=100, lr_decay_iters=0,
               wsd_decay_fraction=0.2)
    del cfg['lr_schedule']
    for schedule in ('cosine', 'wsd'):
        lrs = [get_lr(s, SimpleNamespace(**cfg, lr_schedule=schedule)) for s in range(101)]
        assert lrs[0] < lrs[5] < lrs[10] == 1.0 and lrs[100] == pytest.approx(0.1)
    wsd = [get_lr(s, SimpleNamespace(**cfg, lr_schedule='wsd')) for s in range(101)]
    assert wsd[10] == wsd[80] == 1.0 and wsd[81] < 1.0
    assert get_lr(99, SimpleNamespace(**cfg, lr_schedule='constant')) == 1.0


# --- errors users hit

def test_unknown_config_key_is_refused_with_a_suggestion(data_dir, tmp_path):
    message = error_of(data_dir, tmp_path, '--n_layers=3')
    assert "'n_layers'" in message and 'n_layer' in message.split('mean')[1]


def test_wrong_type_is_refused(data_dir, tmp_path):
    message = error_of(data_dir, tmp_path, '--batch_size=2.5')
    assert 'batch_size' in message and 'int' in message and 'float' in message


def test_missing_data_names_the_prepare_command(tmp_path):
    message = error_of(tmp_path / 'nothing', tmp_path / 'out')
    assert 'prepare' in message


def test_data_vocab_larger_than_the_model_is_refused(data_dir, tmp_path):
    assert 'vocab' in error_of(data_dir, tmp_path, '--vocab_size=100')


def test_block_size_beyond_the_models_context_is_refused(data_dir, tmp_path):
    run(data_dir, tmp_path / 'base', '--max_iters=1', '--eval_interval=1')
    message = error_of(data_dir, tmp_path / 'tuned', f'--init_from={tmp_path / "base"}', '--block_size=64')
    assert 'block_size=64' in message and '32' in message


def test_unwritable_out_dir_is_refused(data_dir, tmp_path):
    (tmp_path / 'file').write_text('not a directory')
    assert 'not writable' in error_of(data_dir, tmp_path / 'file' / 'out')


def test_resume_from_a_different_shape_names_the_fields(data_dir, tmp_path):
    run(data_dir, tmp_path, '--max_iters=1', '--eval_interval=1')
    message = error_of(data_dir, tmp_path, '--init_from=resume', '--n_layer=3', '--max_iters=2')
    assert 'n_layer=2' in message and 'n_layer' in message and 'n_embd' not in message


def test_scratch_run_refuses_to_overwrite_a_checkpoint(data_dir, tmp_path):
    run(data_dir, tmp_path, '--max_iters=1', '--eval_interval=1')
    assert 'init_from=resume' in error_of(data_dir, tmp_path, '--max_iters=1')


def test_bits_per_byte_is_loss_times_tokens_over_bytes_and_none_for_loss_masked_data():
    assert train.bits_per_byte(2.0, {'tokens': 100, 'bytes': 400}) == pytest.approx(2.0 / 0.6931471805599453 / 4)
    assert train.bits_per_byte(2.0, {'tokens': 100, 'bytes': 400, 'trained_tokens': 30}) is None


# --- nothing lost, nothing silent (issue 19)

def sha(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def test_a_signal_during_a_diverging_step_never_saves_non_finite_weights(data_dir, tmp_path, monkeypatch):
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2')
    before = sha(tmp_path / 'ckpt.pt')
    real_get_lr = run_skeleton.get_lr

    def lr_then_sigterm(step, c):  # SIGTERM arrives during the first resumed step, whose update blows up
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get_lr(step, c)
    monkeypatch.setattr(run_skeleton, 'get_lr', lr_then_sigterm)
    message = error_of(data_dir, tmp_path, '--init_from=resume', '--max_iters=10', '--learning_rate=1e40',
                       '--warmup_iters=0', '--grad_clip=0.0')
    assert 'no longer finite' in message and 'still holds the last good checkpoint' in message
    assert sha(tmp_path / 'ckpt.pt') == before


def test_resume_on_data_from_another_tokenizer_is_refused(data_dir, tmp_path):
    run(data_dir, tmp_path / 'run', '--max_iters=1', '--eval_interval=1')
    other = retokenized_copy(data_dir, tmp_path / 'other')
    before = sha(tmp_path / 'run' / 'ckpt.pt')
    assert 'another tokenizer' in error_of(other, tmp_path / 'run', '--init_from=resume', '--max_iters=2')
    assert sha(tmp_path / 'run' / 'ckpt.pt') == before


@pytest.mark.parametrize('setting, words', [('--grad_clip=-1', 'grad_clip'), ('--max_time=-5', 'max_time'),
                                            ('--weight_decay=-1', 'weight_decay'), ('--beta1=1.5', 'beta1'),
                                            ('--ddp_timeout=0', 'ddp_timeout'), ('--seed=-1', 'seed'),
                                            ('--seed=18446744073709551616', 'seed')])
def test_out_of_range_settings_are_refused(data_dir, tmp_path, setting, words):
    assert words in error_of(data_dir, tmp_path, setting)


def test_scratch_run_refuses_an_out_dir_holding_only_best_pt(data_dir, tmp_path):
    run(data_dir, tmp_path, '--max_iters=1', '--eval_interval=1')
    os.remove(tmp_path / 'ckpt.pt')
    before = sha(tmp_path / 'best.pt')
    assert 'best.pt' in error_of(data_dir, tmp_path, '--max_iters=1')
    assert sha(tmp_path / 'best.pt') == before


def test_a_second_run_into_a_busy_out_dir_is_refused(data_dir, tmp_path):
    import fcntl
    os.makedirs(tmp_path / 'out')
    held = os.open(tmp_path / 'out', os.O_RDONLY)  # as a running train.py holds it
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert 'another run is using' in error_of(data_dir, tmp_path / 'out', '--max_iters=1')
    finally:
        os.close(held)
    run(data_dir, tmp_path / 'out', '--max_iters=1')  # free again once the other one is gone
    assert sorted(os.listdir(tmp_path / 'out')) == ['best.pt', 'ckpt.pt', 'config.json', 'log.jsonl']


def test_log_is_plain_json_and_a_resume_logs_each_step_once(data_dir, tmp_path):
    run(data_dir, tmp_path, '--max_iters=4', '--eval_interval=2')
    with open(tmp_path / 'log.jsonl', 'a') as f:  # a run killed after logging step 5, before saving it
        f.write(json.dumps({'step': 5, 'train_loss': 1.0}) + '\n')
    run(data_dir, tmp_path, '--max_iters=6', '--eval_interval=2', '--init_from=resume')
    text = (tmp_path / 'log.jsonl').read_text()
    assert 'NaN' not in text and 'Infinity' not in text
    assert [r['step'] for r in log_lines(tmp_path)] == [0, 1, 2, 3, 4, 5, 6]
    from mirim.out_dir import clean_record
    assert clean_record({'a': float('nan'), 'b': float('inf'), 'c': 1.5}) == {'a': None, 'b': None, 'c': 1.5}


def test_nan_in_a_scratch_run_does_not_name_a_checkpoint_that_is_not_there(data_dir, tmp_path):
    message = error_of(data_dir, tmp_path, '--max_iters=12', '--eval_interval=100', '--learning_rate=1e40',
                       '--warmup_iters=0', '--grad_clip=0.0')
    assert 'no checkpoint was written' in message and 'still holds' not in message


def test_done_after_a_resume_counts_the_whole_run_and_this_session_apart(data_dir, tmp_path, capsys):
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2')
    run(data_dir, tmp_path, '--max_iters=4', '--eval_interval=2', '--init_from=resume')
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith('done:')][-1]
    assert done.startswith('done: 4 steps') and 'this session: 2 steps' in done


def descendants(root):
    """The processes below root (from /proc: each stat line names its parent)."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            parents[int(entry)] = int(open(f'/proc/{entry}/stat').read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError):
            pass
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the worker processes in /proc')
def test_a_frozen_ddp_peer_ends_the_run_with_a_message_within_the_timeout(data_dir, tmp_path):
    process = train_py(data_dir, tmp_path, '--max_iters=100000', '--eval_interval=100000', '--ddp_timeout=5',
                       '--gradient_accumulation_steps=2', torchrun=2)
    wait_for(lambda: (tmp_path / 'log.jsonl').exists() and (tmp_path / 'log.jsonl').read_text().count('\n') >= 3,
             timeout=120, process=process)
    pids = sorted(pid for pid in descendants(process.pid) if b'train.py' in open(f'/proc/{pid}/cmdline', 'rb').read())
    frozen = pids[-1]  # the last worker started: rank 1
    os.kill(frozen, signal.SIGSTOP)
    started, output = time.time(), ''
    try:
        for line in process.stdout:  # until rank 0 gives up; then the frozen one need not hold torchrun up
            output += line
            if 'no answer' in line:
                break
        waited = time.time() - started
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        output += process.communicate(timeout=60)[0]
    assert process.returncode != 0
    assert waited < 30, waited
    assert 'no answer from the other processes for ddp_timeout=5 s' in output


def test_a_full_disk_while_saving_is_one_line_and_leaves_the_last_checkpoint_and_no_temp_file(data_dir, tmp_path,
                                                                                               monkeypatch):
    import errno
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2')
    before = sha(tmp_path / 'ckpt.pt')

    def disk_full(obj, f, *args, **kwargs):
        f.write(b'x' * 1000)  # part of it got written
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', disk_full)
    message = error_of(data_dir, tmp_path, '--init_from=resume', '--max_iters=4', '--eval_interval=2')
    assert 'No space left on device' in message and 'still holds the last good checkpoint' in message
    assert sha(tmp_path / 'ckpt.pt') == before
    assert sorted(os.listdir(tmp_path)) == ['best.pt', 'ckpt.pt', 'config.json', 'log.jsonl']


def test_token_ids_beyond_the_vocab_under_a_valid_header_are_one_line(data_dir, tmp_path):
    import shutil
    bad = shutil.copytree(data_dir, tmp_path / 'bad')
    from mirim.shards import make_header, read_shard
    ids = read_shard(str(bad / 'train_000000.bin')).copy()
    ids[::7] = 300  # the header says vocab 261: these ids have no embedding
    with open(bad / 'train_000000.bin', 'wb') as f:  # written by hand: write_shard would refuse them
        f.write(make_header(2, len(ids), 261) + ids.astype('<u2').tobytes())
    message = error_of(bad, tmp_path / 'out', '--max_iters=2')
    assert 'token id 300' in message and 'prepare the data again' in message


# --- optimizer='muon' and the depth dial

MUON = ['--optimizer=muon', '--muon_lr=0.02']


def test_muon_trains_and_resumes_exactly(data_dir, tmp_path):
    common = [*MUON, '--dropout=0.1', '--eval_interval=100', '--lr_decay_iters=8']
    run(data_dir, tmp_path / 'straight', '--max_iters=8', *common)
    run(data_dir, tmp_path / 'split', '--max_iters=4', *common)
    run(data_dir, tmp_path / 'split', '--max_iters=8', '--init_from=resume', *common)
    losses = train_losses(tmp_path / 'straight')
    assert train_losses(tmp_path / 'split') == losses
    assert losses[-1][1] < losses[0][1] - 0.5
    state = load(tmp_path / 'split' / 'ckpt.pt')['optimizer']
    assert any(g.get('use_muon') for g in state['param_groups'])  # Muon's momentum is in the checkpoint


def test_muon_in_two_processes_matches_one_with_twice_the_accumulation(data_dir, tmp_path):
    args = [*MUON, '--max_iters=4', '--eval_interval=100', '--gradient_accumulation_steps=2']
    process = train_py(data_dir, tmp_path / 'ddp', *args, torchrun=2)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    run(data_dir, tmp_path / 'one', *args)
    one, ddp = train_losses(tmp_path / 'one'), train_losses(tmp_path / 'ddp')
    assert [s for s, _ in ddp] == [1, 2, 3, 4]
    assert torch.allclose(torch.tensor([l for _, l in ddp]), torch.tensor([l for _, l in one]), rtol=1e-5, atol=0)


def test_resume_with_another_optimizer_is_refused(data_dir, tmp_path):
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2')
    assert "optimizer='adamw'" in error_of(data_dir, tmp_path, '--max_iters=4', '--init_from=resume', *MUON)


def test_fine_tuning_with_muon_starts_a_fresh_muon_optimizer(data_dir, tmp_path):
    run(data_dir, tmp_path / 'base', '--max_iters=2', '--eval_interval=2')
    run(data_dir, tmp_path / 'tuned', '--max_iters=2', '--eval_interval=2', f'--init_from={tmp_path / "base"}', *MUON)
    assert any(g.get('use_muon') for g in load(tmp_path / 'tuned' / 'ckpt.pt')['optimizer']['param_groups'])


def test_depth_dial_builds_the_shape_and_sizes_the_run(data_dir, tmp_path, capsys):
    # batch_size and max_iters left to the dial (TINY sets a batch_size: put the default back)
    run(data_dir, tmp_path, '--model=auto', '--depth=2', '--block_size=32', '--batch_size=16', '--tokens_per_param=0.002',
        '--eval_interval=1000')
    out = capsys.readouterr().out
    checkpoint = load(tmp_path / 'ckpt.pt')
    shape = checkpoint['model_config']
    assert (shape['n_layer'], shape['n_embd'], shape['n_head'], shape['n_kv_head']) == (2, 128, 2, 1)
    assert 'depth dial: depth 2' in out and '0.002 tokens/param' in out and 'depth dial: max_iters=' in out
    config = checkpoint['config']
    assert config['batch_size'] == 1  # ~900 tokens want steps of a few tokens: one sequence is the least
    from mirim.checkpoint import load_model
    params = load_model(str(tmp_path))[0].num_params(non_embedding=False)
    assert 0 <= config['max_iters'] * 32 - 0.002 * params < 32 and checkpoint['step'] == config['max_iters']


def test_wandb_logging_works_offline(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_DIR', str(tmp_path))
    monkeypatch.setenv('WANDB_SILENT', 'true')
    run(data_dir, tmp_path / 'out', '--max_iters=2', '--eval_interval=2', '--wandb_log=True')
    assert [r['step'] for r in log_lines(tmp_path / 'out')] == [0, 1, 2]
    assert any(name.startswith('offline-run') for name in os.listdir(tmp_path / 'wandb'))


# --- resume survives the crashes it exists for (issue 30, class 3)

def test_resume_after_a_crash_cut_the_last_log_line_short(data_dir, tmp_path):
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2')
    with open(tmp_path / 'log.jsonl', 'a') as f:  # killed while writing step 3's line
        f.write('{"step": 3, "train_lo')
    run(data_dir, tmp_path, '--max_iters=4', '--eval_interval=2', '--init_from=resume')
    assert [r['step'] for r in log_lines(tmp_path)] == [0, 1, 2, 3, 4]  # every line parses, each step once


@pytest.mark.parametrize('broken', ['clean_record', 'write_json'])  # a log line, or config.json at the start
def test_a_full_disk_while_logging_is_one_line_naming_the_checkpoint(data_dir, tmp_path, monkeypatch, broken):
    import errno
    from mirim import out_dir
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2')
    before = sha(tmp_path / 'ckpt.pt')

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(out_dir, broken, disk_full)
    message = error_of(data_dir, tmp_path, '--init_from=resume', '--max_iters=4', '--eval_interval=2')
    assert 'cannot write the log' in message and 'No space left on device' in message
    assert 'still holds the last good checkpoint' in message and '--init_from=resume' in message
    assert sha(tmp_path / 'ckpt.pt') == before


def test_temp_files_of_a_run_killed_mid_save_are_removed_when_the_out_dir_is_claimed(data_dir, tmp_path):
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2')
    for name in ('ckpt.pt.tmp4242', 'best.pt.tmp17', 'log.jsonl.tmp99'):  # what kill -9 mid-write leaves
        (tmp_path / name).write_bytes(b'x' * 100_000)
    (tmp_path / 'notes.tmp').write_text('mine')  # not a mirim temp file: stays
    run(data_dir, tmp_path, '--max_iters=3', '--eval_interval=3', '--init_from=resume')
    assert sorted(os.listdir(tmp_path)) == ['best.pt', 'ckpt.pt', 'config.json', 'log.jsonl', 'notes.tmp']


def tiny_classifier_config(tmp_path):
    """A 1-layer bytes model and a two-label JSONL task in tmp_path -> classify.py settings (epochs=1)."""
    from dataclasses import asdict
    from conftest import tiny_config
    from model import Llama
    tok = load_tokenizer('bytes')
    config = tiny_config(tok, n_layer=1, n_head=2, n_kv_head=1, ffn_hidden=64)
    torch.save({'model': Llama(config, seed=0).state_dict(), 'model_config': asdict(config),
                'tokenizer': tok.to_dict()}, tmp_path / 'start.pt')
    rng = random.Random(0)
    for name, n in (('train', 60), ('test', 20)):
        with open(tmp_path / f'{name}.jsonl', 'w') as f:
            for _ in range(n):
                label = rng.choice(['a', 'z'])
                f.write(json.dumps({'text': label * rng.randint(2, 6), 'label': label}) + '\n')
    return dict(init_from=str(tmp_path / 'start.pt'), train_file=str(tmp_path / 'train.jsonl'),
                test_file=str(tmp_path / 'test.jsonl'), out_dir=str(tmp_path / 'out'), epochs=1, batch_size=8,
                device='cpu')


def test_a_full_disk_at_the_end_of_a_classifier_run_costs_no_training(tmp_path, monkeypatch):
    import errno
    import classify
    cfg = tiny_classifier_config(tmp_path)
    real_save = classify.save_atomic

    def disk_full(obj, path):
        raise OSError(errno.ENOSPC, f"No space left on device: {path}")
    monkeypatch.setattr(classify, 'save_atomic', disk_full)
    with pytest.raises(SystemExit, match='No space left.*ckpt.pt holds the finished run.*--init_from=resume'):
        classify.train_classifier(cfg)
    assert not (tmp_path / 'out' / 'classifier.pt').exists() and (tmp_path / 'out' / 'ckpt.pt').exists()
    monkeypatch.setattr(classify, 'save_atomic', real_save)
    result = classify.train_classifier({**cfg, 'init_from': 'resume'})  # nothing left to train: it finishes
    assert (tmp_path / 'out' / 'classifier.pt').exists() and 0 <= result['accuracy'] <= 1


def test_a_run_resumes_only_with_the_command_that_wrote_it(data_dir, tmp_path):
    import classify
    cfg = tiny_classifier_config(tmp_path)
    classify.train_classifier(cfg)
    message = error_of(data_dir, cfg['out_dir'], '--init_from=resume', '--max_iters=1000')  # train.py on it
    assert 'ckpt.pt' in message and '\n' not in message  # its shape or its maker: one line either way
    run(data_dir, tmp_path / 'lm', '--max_iters=1', '--eval_interval=1')
    with pytest.raises(SystemExit, match='classify.py'):  # and the other way round
        classify.train_classifier({**cfg, 'init_from': 'resume', 'out_dir': str(tmp_path / 'lm')})
    saved = torch.load(tmp_path / 'lm' / 'ckpt.pt', weights_only=True)
    assert saved['command'] == 'train.py' and saved['format_version'] == 1  # what it holds, in which format


@pytest.mark.parametrize('entry', [{'command': 'dpo.py'}, {'dpo': {'beta': 0.1}, 'command': None}])
def test_resume_names_the_command_that_wrote_the_checkpoint(data_dir, tmp_path, entry):
    run(data_dir, tmp_path, '--max_iters=1', '--eval_interval=1')
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    torch.save({**ckpt, **entry}, tmp_path / 'ckpt.pt')  # by its entry, or (older files) by what it holds
    message = error_of(data_dir, tmp_path, '--init_from=resume', '--max_iters=2')
    assert 'written by dpo.py' in message and 'resume it with dpo.py' in message
