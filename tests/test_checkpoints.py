"""An older or hand-edited checkpoint never loads as another model (mirim/checkpoint.py's model_from_checkpoint,
the one way a mirim checkpoint becomes a model): a model_config key that decides the model, missing or of the
wrong type, or weights that do not fit model_config, are one line naming the key or the tensor, in sample.py,
eval.py, export.py and train.py (fine-tuning and resuming) alike; complete checkpoints load as before."""
import os
import shutil
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import eval as eval_cmd  # noqa: E402
import export  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from conftest import tiny_model  # noqa: E402
from mirim.checkpoint import CheckpointError, MODEL_CONFIG_KEYS, load_model  # noqa: E402
from mirim.prepare import tokenizer_fields  # noqa: E402
from mirim.shards import write_meta, write_shard  # noqa: E402
from mirim.tokenizer import load_tokenizer  # noqa: E402
from model import LlamaConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')


def checkpoint_of(model, tok):
    """What mirim writes (run.py's save without the training state): every model_config key."""
    return {'model': model.state_dict(), 'model_config': asdict(model.config), 'tokenizer': tok.to_dict()}


@pytest.fixture(scope='module')
def tok():
    return load_tokenizer('bytes')


@pytest.fixture(scope='module')
def data(tmp_path_factory, tok):
    """A tiny token data set of the bytes tokenizer, for train.py."""
    root = str(tmp_path_factory.mktemp('data'))
    rng = np.random.default_rng(0)
    meta = {**tokenizer_fields(tok, root), 'splits': {}}
    for split, n in (('train', 2000), ('val', 400)):
        write_shard(os.path.join(root, f'{split}_000000.bin'), rng.integers(0, 256, n), tok.vocab_size)
        meta['splits'][split] = {'tokens': n, 'bytes': n, 'documents': 1, 'shards': [f'{split}_000000.bin']}
    write_meta(root, meta)
    return root


def untied(tok):
    model = tiny_model(seed=1, tokenizer=tok, tie_embeddings=False)
    ckpt = checkpoint_of(model, tok)
    ckpt['model_config']['tie_embeddings'] = True  # the config of another model: tied
    return ckpt


def edited(key, value):
    def change(tok):
        ckpt = checkpoint_of(tiny_model(seed=1, tokenizer=tok), tok)
        if value is None:
            del ckpt['model_config'][key]
        else:
            ckpt['model_config'][key] = value
        return ckpt
    return change


def without_tensor(name):
    def change(tok):
        ckpt = checkpoint_of(tiny_model(seed=1, tokenizer=tok), tok)
        del ckpt['model'][name]
        return ckpt
    return change


# (what is wrong, the checkpoint, what the one line must name)
CASES = {
    'no tie_embeddings': (edited('tie_embeddings', None), 'lacks tie_embeddings'),
    'no activation': (edited('activation', None), 'lacks activation'),
    'no block_size': (edited('block_size', None), 'lacks block_size'),
    'no rope_theta nor norm_eps': (lambda tok: {**edited('rope_theta', None)(tok), 'model_config': {
        k: v for k, v in edited('rope_theta', None)(tok)['model_config'].items() if k != 'norm_eps'}},
        'lacks rope_theta, norm_eps'),
    "tie_embeddings='false'": (edited('tie_embeddings', 'false'), "tie_embeddings='false'"),
    'tied config, untied weights': (untied, 'output.weight and tok_embeddings.weight differ'),
    'ffn_hidden edited': (edited('ffn_hidden', 64), 'layers.0.feed_forward.w13.weight has shape (96, 32)'),
    'one layer more in model_config': (edited('n_layer', 3), 'lack layers.2.attention_norm.weight'),
    'one layer less in model_config': (edited('n_layer', 1), 'hold layers.1.attention_norm.weight'),
    'a tensor missing': (without_tensor('norm.weight'), 'lack norm.weight'),
}


# a resume first compares the checkpoint's shape with the run's config (mirim/init_from.py): an edited shape key
# is named there
RESUME_WORDS = {'ffn_hidden edited': 'ffn_hidden=64 (this config: 48)', 'one layer more in model_config': 'n_layer=3',
                'one layer less in model_config': 'n_layer=1'}
TRAIN = ['--model=tiny', '--device=cpu', '--max_iters=1', '--eval_iters=1', '--batch_size=2']


def run_entry(entry, path, data, tmp_path):
    """Load the checkpoint at path as the command `entry` does -> (its error line, the file it read)."""
    if entry == 'export':
        with pytest.raises(ValueError) as e:
            export.main([f'--out_dir={path}', f'--dest={tmp_path / "hf"}'])
        return str(e.value), path
    if entry == 'train resume':  # the run's shape is the checkpoint's: tiny_config
        os.makedirs(tmp_path / 'run')
        path = shutil.copy(path, tmp_path / 'run' / 'ckpt.pt')
    command = {'sample': lambda: sample.main([f'--out_dir={path}', '--device=cpu', '--max_new_tokens=2']),
               'eval': lambda: eval_cmd.main([f'--checkpoint={path}', f'--data_dir={data}', '--device=cpu',
                                              f'--output={tmp_path / "eval.json"}']),
               'train': lambda: train.main(TRAIN + ['--block_size=16', f'--data_dir={data}',
                                                    f'--out_dir={tmp_path / "run"}', f'--init_from={path}']),
               'train resume': lambda: train.main(TRAIN + ['--block_size=32', '--n_layer=2', '--n_head=4',
                                                           '--n_kv_head=2', '--n_embd=32', '--ffn_hidden=48',
                                                           '--activation=silu', f'--data_dir={data}',
                                                           f'--out_dir={tmp_path / "run"}', '--init_from=resume'])}
    with pytest.raises((SystemExit, ValueError)) as e:
        command[entry]()
    return str(e.value.code if isinstance(e.value, SystemExit) else e.value), path


@pytest.mark.parametrize('entry', ['sample', 'eval', 'export', 'train', 'train resume'])
@pytest.mark.parametrize('case', list(CASES))
def test_a_checkpoint_that_is_not_its_model_is_one_line_naming_the_key_or_tensor(case, entry, tok, data, tmp_path):
    make, words = CASES[case]
    path = tmp_path / 'ckpt.pt'
    torch.save(make(tok), path)
    message, read = run_entry(entry, path, data, tmp_path)
    assert (RESUME_WORDS.get(case, words) if entry == 'train resume' else words) in message, message
    assert str(read) in message  # names the file
    assert '\n' not in message and 'Traceback' not in message


def test_every_key_that_decides_the_model_is_required():
    """MODEL_CONFIG_KEYS is every LlamaConfig field but dropout: a new field must be added (or let default here)."""
    from dataclasses import fields
    assert set(MODEL_CONFIG_KEYS) == {f.name for f in fields(LlamaConfig)} - {'dropout'}


def test_complete_checkpoints_load_as_the_model_they_were_saved_from(tok, tmp_path):
    """A current checkpoint, one without the optional dropout, and a tied one without output.weight (it is the
    embedding) all load and give the logits of the model saved; an untied one too."""
    idx = torch.tensor([[1, 5, 9, 200, 17]])
    for n, model in enumerate([tiny_model(seed=2, tokenizer=tok), tiny_model(seed=3, tokenizer=tok,
                                                                               tie_embeddings=False)]):
        want = model(idx)[0]
        variants = {'current': checkpoint_of(model, tok)}
        older = checkpoint_of(model, tok)
        del older['model_config']['dropout']
        variants['no dropout'] = older
        if model.config.tie_embeddings:
            no_head = checkpoint_of(model, tok)
            del no_head['model']['output.weight']
            variants['tied, no output.weight'] = no_head
        for name, ckpt in variants.items():
            path = tmp_path / f'{n}-{name}.pt'
            torch.save(ckpt, path)
            loaded, _, _ = load_model(str(path))
            assert loaded.config == model.config, name
            assert torch.equal(loaded(idx)[0], want), name


def test_the_error_is_a_checkpoint_error(tok, tmp_path):
    path = tmp_path / 'ckpt.pt'
    torch.save(edited('activation', None)(tok), path)
    with pytest.raises(CheckpointError, match='activation'):
        load_model(str(path))
