"""parallel='fsdp' (mirim/fsdp.py): FSDP2 in 2 processes on the CPU (gloo) equals one process with twice the
accumulation, sharded checkpoints resume exactly (on the same and on another number of processes), survive
kill -9 mid-save, and are read by every command that reads a checkpoint. Three torchrun launches in all
(the bit-for-bit resume is the one-process test's); the rest runs in this process (one process is never sharded, but saves and reads the sharded format)."""
import os
import shutil
import signal
import sys

import pytest
import torch

from test_train import ROOT, error_of, log_lines, run, train_losses, train_py, wait_for  # noqa: F401
from test_train import make_corpus

sys.path.insert(0, ROOT)
from mirim.checkpoint import load_checkpoint, load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')
FSDP = ['--parallel=fsdp', '--gradient_accumulation_steps=2', '--eval_interval=4', '--lr_decay_iters=8',
        '--eval_iters=3']  # 3 evaluation batches: one process runs one more forward than the other


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp('corpus'))


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
    """Launched once for the tests below: 4 steps in 2 FSDP processes (saved at step 4, copied), resumed to 8 in 2
    processes; the reference, one process with twice the accumulation: 4 steps (saved, copied), resumed to 8."""
    root = tmp_path_factory.mktemp('fsdp')
    first = train_py(data_dir, root / 'fsdp', '--max_iters=4', *FSDP, torchrun=2)
    output = first.communicate(timeout=180)[0]
    assert first.returncode == 0, output
    shutil.copytree(root / 'fsdp', root / 'fsdp_at_4', symlinks=True)
    second = train_py(data_dir, root / 'fsdp', '--max_iters=8', '--init_from=resume', *FSDP, torchrun=2)
    assert second.wait(timeout=180) == 0, second.stdout.read()
    one = [a for a in FSDP if a != '--parallel=fsdp']
    run(data_dir, root / 'one', '--max_iters=4', *one)
    shutil.copytree(root / 'one', root / 'one_at_4')
    run(data_dir, root / 'one', '--max_iters=8', '--init_from=resume', *one)
    return root, output


def weights(path):
    return load_checkpoint(str(path))['model']


def assert_close(a, b):
    """float32 rounding apart: the two processes' gradients are summed by a reduce-scatter, one process adds its
    two micro-batches' in another order (~1e-7 relative a sum), and AdamW's steps carry that on; nothing more.
    Measured: 7e-8 at most after 4 steps (weights up to 1.0); 1e-6 leaves room for 8 steps."""
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name


def test_two_fsdp_processes_match_one_with_twice_the_accumulation(runs):
    root, output = runs
    one, fsdp = train_losses(root / 'one'), train_losses(root / 'fsdp')
    assert [s for s, _ in fsdp] == list(range(1, 9))
    assert torch.allclose(torch.tensor([l for _, l in fsdp]), torch.tensor([l for _, l in one]), rtol=1e-5, atol=0)
    assert_close(weights(root / 'fsdp_at_4' / 'ckpt.dcp'), weights(root / 'one_at_4' / 'ckpt.pt'))
    assert_close(weights(root / 'fsdp' / 'ckpt.dcp'), weights(root / 'one' / 'ckpt.pt'))  # after a resume too
    assert 'FSDP2' in output and output.count('config:') == 1 and 'Warning' not in output
    # one set of files, written by rank 0; one sharded folder, both links naming it
    assert sorted(os.listdir(root / 'fsdp')) == ['best.dcp', 'ckpt.dcp', 'config.json', 'log.jsonl', 'sharded']
    assert os.listdir(root / 'fsdp' / 'sharded') == ['step-00000008']
    assert os.readlink(root / 'fsdp' / 'ckpt.dcp') == os.path.join('sharded', 'step-00000008')


def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(data_dir, runs):
    root, _ = runs
    run(data_dir, root / 'fsdp_at_4', '--max_iters=8', '--init_from=resume', *FSDP)  # 2 processes, then 1
    resumed, one = train_losses(root / 'fsdp_at_4'), train_losses(root / 'one')
    assert [s for s, _ in resumed] == list(range(1, 9))
    assert torch.allclose(torch.tensor([l for _, l in resumed]), torch.tensor([l for _, l in one]), rtol=1e-5, atol=0)
    assert_close(weights(root / 'fsdp_at_4' / 'ckpt.dcp'), weights(root / 'one' / 'ckpt.pt'))


def test_one_process_resumes_a_sharded_checkpoint_exactly_random_state_included(data_dir, tmp_path):
    common = ['--parallel=fsdp', '--dropout=0.1', '--eval_interval=100', '--lr_decay_iters=8']
    run(data_dir, tmp_path / 'straight', '--max_iters=8', *common)
    run(data_dir, tmp_path / 'split', '--max_iters=4', *common)
    run(data_dir, tmp_path / 'split', '--max_iters=8', '--init_from=resume', *common)
    assert train_losses(tmp_path / 'split') == train_losses(tmp_path / 'straight')


def test_commands_read_a_sharded_checkpoint_and_consolidate_writes_one_file(runs, tmp_path):
    import consolidate
    root, _ = runs
    model, tokenizer, ckpt = load_model(str(root / 'fsdp'))  # what sample.py, eval.py, export.py call
    assert ckpt['step'] == 8 and tokenizer.kind == 'bytes'
    best, _, _ = load_model(str(root / 'fsdp'), checkpoint='best.pt')  # best.dcp
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), best.parameters()))
    consolidate.main([f'--out_dir={root / "fsdp"}', f'--output={tmp_path / "model.pt"}'])
    single = torch.load(tmp_path / 'model.pt', weights_only=True)
    assert 'optimizer' not in single and single['step'] == 8
    again, _, _ = load_model(str(tmp_path / 'model.pt'))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    with pytest.raises(ValueError, match='--overwrite'):
        consolidate.main([f'--out_dir={root / "fsdp"}', f'--output={tmp_path / "model.pt"}'])


def test_muon_with_fsdp_is_refused_in_one_line(data_dir, tmp_path):
    message = error_of(data_dir, tmp_path, '--parallel=fsdp', '--optimizer=muon')
    assert "optimizer='muon' does not run with parallel='fsdp'" in message and '\n' not in message


def test_activation_checkpointing_computes_the_same_steps(data_dir, tmp_path):
    run(data_dir, tmp_path / 'plain', '--max_iters=3', '--eval_interval=100')
    run(data_dir, tmp_path / 'ac', '--max_iters=3', '--eval_interval=100', '--activation_checkpointing=True')
    assert train_losses(tmp_path / 'ac') == train_losses(tmp_path / 'plain')


def test_a_checkpoint_resumes_only_with_the_parallel_that_wrote_it(data_dir, tmp_path):
    assert error_of(data_dir, tmp_path, '--parallel=zero').endswith("parallel must be 'ddp' or 'fsdp'")
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2', '--parallel=fsdp')
    assert "resume it with --parallel=fsdp" in error_of(data_dir, tmp_path, '--max_iters=4', '--init_from=resume')
    assert 'already holds a run (ckpt.dcp, best.dcp)' in error_of(data_dir, tmp_path, '--parallel=fsdp')
    run(data_dir, tmp_path / 'ddp', '--max_iters=2', '--eval_interval=2')
    assert "resume it with --parallel=ddp" in error_of(data_dir, tmp_path / 'ddp', '--max_iters=4', '--parallel=fsdp',
                                                       '--init_from=resume')


def test_nan_loss_leaves_the_last_sharded_checkpoint(data_dir, tmp_path):
    run(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2', '--parallel=fsdp')
    before = weights(tmp_path / 'ckpt.dcp')
    message = error_of(data_dir, tmp_path, '--init_from=resume', '--max_iters=12', '--eval_interval=1',
                       '--parallel=fsdp', '--learning_rate=1e12', '--warmup_iters=0', '--grad_clip=0.0')
    assert 'ckpt.dcp still holds the last good checkpoint' in message
    after = load_checkpoint(str(tmp_path / 'ckpt.dcp'))
    assert after['step'] == 2 and all(torch.equal(before[k], after['model'][k]) for k in before)


# train.py with a sharded save slowed down: each process's part is written, then a pause before run.pt (the
# file that completes the folder)
SLOW_SAVE = """import sys, time
sys.path.insert(0, {root!r})
import mirim.fsdp
import train
save = mirim.fsdp.save_atomic
def slow_save(obj, path):
    time.sleep(1)
    save(obj, path)
mirim.fsdp.save_atomic = slow_save
train.main(sys.argv[1:])
"""


def test_kill_9_during_a_sharded_save_keeps_the_previous_one(data_dir, tmp_path):
    script = tmp_path / 'slow_save.py'
    script.write_text(SLOW_SAVE.format(root=ROOT))
    out = tmp_path / 'out'
    process = train_py(data_dir, out, '--max_iters=100000', '--eval_interval=2', '--parallel=fsdp', script=str(script))
    writing = lambda: (out / 'sharded').is_dir() and any(p.name.endswith('.tmp') for p in (out / 'sharded').iterdir())  # noqa: E731
    wait_for(lambda: (out / 'ckpt.dcp').exists() and writing(), process=process)  # the second save is under way
    process.kill()
    process.communicate(timeout=60)
    assert load_checkpoint(str(out / 'ckpt.dcp'))['step'] == 2
    run(data_dir, out, '--max_iters=3', '--eval_interval=100', '--parallel=fsdp', '--init_from=resume')
    assert os.listdir(out / 'sharded') == ['step-00000003']  # the half-written folder is gone, and the old one
    assert [r['step'] for r in log_lines(out) if r['train_loss'] is not None][-1] == 3


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the worker processes in /proc')
def test_sigterm_to_one_fsdp_process_stops_both_after_the_same_step_and_saves(data_dir, tmp_path):
    """SIGTERM to rank 1 only: both stop after one step, with a sharded save; the steps are one process's (a
    constant rate, so that the run the signal stopped and the reference of as many steps share a schedule)."""
    from test_train import descendants
    settings = ['--lr_schedule=constant', '--parallel=fsdp', '--gradient_accumulation_steps=2', '--eval_interval=100000']
    process = train_py(data_dir, tmp_path / 'fsdp', '--max_iters=100000', *settings, torchrun=2)
    log = tmp_path / 'fsdp' / 'log.jsonl'
    wait_for(lambda: log.exists() and log.read_text().count('\n') >= 3, timeout=120, process=process)
    pids = sorted(pid for pid in descendants(process.pid) if b'train.py' in open(f'/proc/{pid}/cmdline', 'rb').read())
    os.kill(pids[-1], signal.SIGTERM)  # rank 1 only
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert 'stopped by a signal to another process' in output and 'ckpt.dcp' in output
    fsdp = load_checkpoint(str(tmp_path / 'fsdp' / 'ckpt.dcp'))
    assert fsdp['step'] >= 2 and fsdp['step'] == log_lines(tmp_path / 'fsdp')[-1]['step']
    run(data_dir, tmp_path / 'one', f'--max_iters={fsdp["step"]}', *[a for a in settings if a != '--parallel=fsdp'])
    one, two = train_losses(tmp_path / 'one'), train_losses(tmp_path / 'fsdp')
    assert [s for s, _ in two] == [s for s, _ in one]
    assert torch.allclose(torch.tensor([l for _, l in two]), torch.tensor([l for _, l in one]), rtol=1e-5, atol=0)
    assert_close(fsdp['model'], weights(tmp_path / 'one' / 'ckpt.pt'))


# --- plan.py: when a model needs FSDP

def test_the_tinyllama_preset_has_its_published_parameter_count():
    from model import Llama, config_from_preset
    with torch.device('meta'):
        model = Llama(config_from_preset('tinyllama-1.1b'))
    assert model.num_params(non_embedding=False) == 1_100_048_384  # TinyLlama-1.1B's config.json shape


def test_the_activation_estimate_is_what_the_backward_keeps():
    """plan.memory_plan's activations against the bytes autograd saves in a bf16 forward (weights left out)."""
    import plan
    from model import Llama, LlamaConfig
    shape = dict(vocab_size=512, block_size=64, n_layer=3, n_head=8, n_kv_head=2, n_embd=128, ffn_hidden=344)
    model = Llama(LlamaConfig(**shape))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    x = torch.randint(0, 512, (4, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast('cpu', dtype=torch.bfloat16):
        model(x, x, return_logits=False)
    measured = sum(size for ptr, size in saved.items() if ptr not in weights)
    assert 0.8 < plan.memory_plan(shape, 4)['activations'] / measured < 1.25


def test_plan_says_when_a_model_needs_fsdp_and_prints_the_command(capsys):
    import plan
    result = plan.main(['config/tinyllama_1b.py', '--gpu=A100', '--gpu_memory=40', '--num_gpus=8'])
    memory = result['memory']
    assert memory['states'] == 16 * 1_100_048_384  # fp32 weights, gradients, AdamW's two moments
    assert memory['advice'] == ('fsdp', 8, False) and memory['ddp'] > 0.9 * 40e9
    assert memory['fsdp'][8][0] < 0.9 * 40e9 < memory['ddp']
    assert ('torchrun --standalone --nproc_per_node=8 train.py config/tinyllama_1b.py --parallel=fsdp'
            in capsys.readouterr().out)
    assert plan.main(['config/tinyllama_1b.py', '--gpu=H100'])['memory']['advice'][0] == 'ddp'  # 80 GB: fits
    tight = plan.main(['config/tinyllama_1b.py', '--gpu_memory=12', '--num_gpus=8'])['memory']
    assert tight['advice'] == ('fsdp', 8, True)  # only with activation checkpointing
    assert plan.main(['config/tinyllama_1b.py', '--gpu_memory=2', '--num_gpus=2'])['memory']['advice'] is None
