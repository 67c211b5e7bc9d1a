"""The wrong kind of data is never trained on silently: each case is refused with one line saying what the data
(or the starting model) is and what to do instead, or, where the run is legitimate, said aloud.

Where each is decided: train.py's Pretraining.set_up (preference pairs are not next-token data),
mirim/shards.py's open_split (a loss-masked data set must have its masks; a split with masks must have a trained
token), dpo.py's check_start_template (the pairs' chat template against the starting model's) and classify.py's
Classification.load_start (a classifier as init_from: its head goes on when the labels match, else refused)."""
import glob
import json
import os
import random
import shutil
import sys
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import classify  # noqa: E402
import dpo  # noqa: E402
import eval as eval_cmd  # noqa: E402
import train  # noqa: E402
from conftest import tiny_model  # noqa: E402
from mirim.chat import CHAT_TEMPLATES  # noqa: E402
from mirim.chat_data import prepare_chat  # noqa: E402
from mirim.pref_data import pair_messages, prepare_pref  # noqa: E402
from mirim.shards import load_meta, mask_path, write_mask, write_meta  # noqa: E402
from mirim.tokenizer import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')

TRAIN = ['--model=tiny', '--device=cpu', '--max_iters=2', '--eval_interval=2', '--eval_iters=1', '--batch_size=2',
         '--block_size=32']
DPO = ['--device=cpu', '--dtype=float32', '--batch_size=4', '--eval_pairs=4', '--max_iters=1', '--warmup_iters=0']


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """A chat data set, a preference data set (both ChatML, the bytes tokenizer), a base model (no chat template),
    an SFT-like model (ChatML), one fine-tuned on Aira's template, and classification files."""
    root = tmp_path_factory.mktemp('kinds')
    tok = load_tokenizer('bytes')
    rng = random.Random(0)
    words = ['luz', 'paz', 'terra', 'agua', 'povo', 'rei', 'mar', 'pao']
    chats = [[{'role': 'user', 'content': f"diga {i} palavras sobre {rng.choice(words)}"},
              {'role': 'assistant', 'content': ' '.join(rng.choice(words) for _ in range(8))}] for i in range(48)]
    prepare_chat(chats, tok, 'chatml', str(root / 'chat'), val_fraction=0.25)
    pairs = [(f"pair {i}", pair_messages({'prompt': f"diga algo {i}", 'chosen': rng.choice(words[:4]),
                                          'rejected': rng.choice(words[4:])}, f"pair {i}")) for i in range(24)]
    prepare_pref(pairs[:16], tok, 'chatml', str(root / 'pref'), max_length=64, val_pairs=pairs[16:])
    data_tok = load_tokenizer(load_meta(str(root / 'pref'))['tokenizer']).to_dict()  # ChatML's template with it
    model = tiny_model(seed=0, tokenizer=tok, block_size=64)
    start = {'model': model.state_dict(), 'model_config': asdict(model.config)}
    models = {'base': {**start, 'tokenizer': tok.to_dict()}, 'sft': {**start, 'tokenizer': data_tok},
              'aira': {**start, 'tokenizer': {**data_tok, 'chat_template': CHAT_TEMPLATES['aira']}}}
    for name, ckpt in models.items():
        torch.save(ckpt, root / f'{name}.pt')
    for split, n in (('train', 40), ('test', 12)):
        with open(root / f'{split}.jsonl', 'w', encoding='utf-8') as f:
            for i in range(n):
                label = ['claro', 'escuro'][i % 2]
                f.write(json.dumps({'text': ('abcd' if label == 'claro' else 'wxyz') * 3, 'label': label}) + '\n')
    return root


def copy(world, name, tmp_path):
    return shutil.copytree(world / name, tmp_path / name)


def classifier(world, labels, path):
    """A classify.py checkpoint of the base model, with a head for `labels`."""
    ckpt = torch.load(world / 'base.pt', weights_only=True)
    head = torch.randn(len(labels), ckpt['model_config']['n_embd'], generator=torch.Generator().manual_seed(5))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({**ckpt, 'head': {'weight': head}, 'labels': labels, 'config': {'init_from': str(world / 'base.pt')},
                'classify': {'max_length': 32}}, path)
    return str(path)


def classify_settings(world, tmp_path, init_from):
    return dict(init_from=init_from, train_file=str(world / 'train.jsonl'), test_file=str(world / 'test.jsonl'),
                out_dir=str(tmp_path / 'cls'), epochs=1, batch_size=8, device='cpu')


def fails(command, *words):
    with pytest.raises(SystemExit) as e:
        command()
    message = str(e.value.code)
    assert all(w in message for w in words), message
    assert '\n' not in message
    return message


# --- the cases: each builds its data and runs the command the way a user would

def train_on_preference_pairs(world, tmp_path, capsys):
    fails(lambda: train.main(TRAIN + [f'--data_dir={world / "pref"}', f'--out_dir={tmp_path / "o"}']),
          'holds preference pairs', 'rejected replies', f'dpo.py --data_dir={world / "pref"}')
    assert not os.path.exists(tmp_path / 'o' / 'ckpt.pt')


def train_on_chat_without_masks(world, tmp_path, capsys):
    data = copy(world, 'chat', tmp_path)
    for path in glob.glob(os.path.join(data, '*.mask.bin')):
        os.remove(path)
    fails(lambda: train.main(TRAIN + [f'--data_dir={data}', f'--out_dir={tmp_path / "o"}']),
          'train_000000.mask.bin missing', 'chat data', 'prompts would be trained on')


def train_on_chat_whose_val_masks_are_gone(world, tmp_path, capsys):  # not in the issue: the train masks are there
    data = copy(world, 'chat', tmp_path)
    os.remove(mask_path(os.path.join(data, 'val_000000.bin')))
    fails(lambda: train.main(TRAIN + [f'--data_dir={data}', f'--out_dir={tmp_path / "o"}']),
          'val_000000.mask.bin missing', "'val' shards are loss-masked")


def train_on_masks_that_are_all_0(world, tmp_path, capsys):  # meta.json still counts trained tokens: the masks decide
    data = copy(world, 'chat', tmp_path)
    for path in glob.glob(os.path.join(data, 'train_*.mask.bin')):
        n = int(np.fromfile(path, dtype='<i4', count=4)[3])
        write_mask(path, np.zeros(n, dtype=np.uint8))
    fails(lambda: train.main(TRAIN + [f'--data_dir={data}', f'--out_dir={tmp_path / "o"}']),
          "'train' split has no trained token")
    assert not os.path.exists(tmp_path / 'o' / 'best.pt')


def eval_on_a_split_meta_counts_no_trained_token(world, tmp_path, capsys):  # not in the issue: eval.py, meta.json
    data = copy(world, 'chat', tmp_path)
    meta = load_meta(data)
    meta['splits']['val']['trained_tokens'] = 0
    write_meta(data, meta)
    fails(lambda: eval_cmd.main([f'--checkpoint={world / "sft.pt"}', f'--data_dir={data}', '--device=cpu',
                                 f'--output={tmp_path / "eval.json"}']), "'val' split has no trained token")


def dpo_from_a_base_model(world, tmp_path, capsys):  # said aloud, and the run goes on
    dpo.main(DPO + [f'--data_dir={world / "pref"}', f'--init_from={world / "base.pt"}', f'--out_dir={tmp_path / "o"}'])
    out = capsys.readouterr().out
    assert 'carries no chat template' in out and "'chatml' template" in out and '<|im_start|>' in out, out
    assert os.path.exists(tmp_path / 'o' / 'ckpt.pt')


def dpo_from_a_model_of_another_template(world, tmp_path, capsys):  # not in the issue: an SFT model of Aira's
    fails(lambda: dpo.main(DPO + [f'--data_dir={world / "pref"}', f'--init_from={world / "aira.pt"}',
                                  f'--out_dir={tmp_path / "o"}']),
          "'chatml' chat template", "fine-tuned on the 'aira' template", f'--model {world / "aira.pt"}')
    assert not os.path.exists(tmp_path / 'o' / 'reference.pt')


def classify_from_a_classifier_of_other_labels(world, tmp_path, capsys):
    path = classifier(world, ['a', 'b', 'c'], tmp_path / 'old' / 'classifier.pt')
    fails(lambda: classify.train_classifier(classify_settings(world, tmp_path, path)),
          "a classifier of the labels ['a', 'b', 'c']", '--init_from=resume', 'backbone', str(world / 'base.pt'))


def classify_from_a_classify_out_dir_of_the_same_labels(world, tmp_path, capsys):  # not in the issue: its ckpt.pt
    path = classifier(world, ['claro', 'escuro'], tmp_path / 'old' / 'ckpt.pt')
    c = SimpleNamespace(**{**classify.DEFAULTS, **classify_settings(world, tmp_path, str(tmp_path / 'old'))})
    task = classify.Classification()
    task.check_config(c)
    model, _, _, _ = task.load_start(c)
    assert torch.equal(model.head.weight, torch.load(path, weights_only=True)['head']['weight'])  # the head goes on
    assert 'its head goes on training' in capsys.readouterr().out


CASES = [train_on_preference_pairs, train_on_chat_without_masks, train_on_chat_whose_val_masks_are_gone,
         train_on_masks_that_are_all_0, eval_on_a_split_meta_counts_no_trained_token, dpo_from_a_base_model,
         dpo_from_a_model_of_another_template, classify_from_a_classifier_of_other_labels,
         classify_from_a_classify_out_dir_of_the_same_labels]


@pytest.mark.parametrize('case', CASES, ids=[c.__name__ for c in CASES])
def test_the_wrong_kind_of_data_is_never_trained_on_silently(case, world, tmp_path, capsys):
    case(world, tmp_path, capsys)


def test_the_right_kinds_still_train(world, tmp_path, capsys):
    """A chat data set with its masks trains (SFT), and DPO from the SFT model says nothing about templates."""
    train.main(TRAIN + [f'--data_dir={world / "chat"}', f'--out_dir={tmp_path / "sft"}'])
    assert os.path.exists(tmp_path / 'sft' / 'ckpt.pt')
    capsys.readouterr()
    dpo.main(DPO + [f'--data_dir={world / "pref"}', f'--init_from={world / "sft.pt"}', f'--out_dir={tmp_path / "o"}'])
    assert 'chat template' not in capsys.readouterr().out
    assert os.path.exists(tmp_path / 'o' / 'ckpt.pt')
