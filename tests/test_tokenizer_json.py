"""The 'tokenizers' kind (any Hugging Face tokenizer.json) and byte-level BPE training, checked against
transformers' AutoTokenizer, through prepare -> train -> sample -> export -> AutoTokenizer."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import export  # noqa: E402
from mirim import hf_tokenizer  # noqa: E402
import train  # noqa: E402
from mirim.checkpoint import load_model  # noqa: E402
from conftest import tiny_sentencepieces, word_rotations  # noqa: E402
from data import prepare as prep  # noqa: E402
from mirim.prepare import is_val_document  # noqa: E402
from mirim.hf import load_hf  # noqa: E402
from mirim.sampling import sample_prompts  # noqa: E402
from mirim.shards import read_shard  # noqa: E402
from mirim.tokenizer import load_tokenizer, same_tokenizer, tokenizer_stats, train_bytelevel_bpe  # noqa: E402

transformers = pytest.importorskip('transformers')
transformers.logging.set_verbosity_error()

SAMPLES = [
    "No princípio criou Deus os céus e a terra. Ação, coração, pão e avó! Custa R$ 3,50 em 1948.",
    "आदि में परमेश्वर ने आकाश और पृथ्वी की सृष्टि की। क़लम और ज़मीन",
    "আদিতে ঈশ্বর আকাশমণ্ডল ও পৃথিবী সৃষ্টি করলেন।",
    "起初，神创造天地。地是空虚混沌，渊面黑暗。",
    "Bom dia 😀🚀 👩🏽‍💻 🇧🇷 tudo bem?",
    "  two leading spaces,\ttabs\nand new lines\n\n  ",
    "<|im_start|>user\nOlá, tudo bem?<|im_end|>\n<|im_start|>assistant\nTudo! 🙂<|im_end|>",
]
UNSEEN = "Ελληνικά, ქართული, 한국어 ᚠᛇᚻ 𝄞 ∮ E⋅da = Q"  # scripts the tokenizers never saw

pytestmark = pytest.mark.usefixtures('one_thread')


def write_folder(folder, tokenizer_json, **config):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'tokenizer.json'), 'w', encoding='utf-8') as f:
        f.write(tokenizer_json)
    if config:
        with open(os.path.join(folder, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
            json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', **config}, f)
    return str(folder)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """HF tokenizer folders: a byte-level BPE trained here (no config: names guessed), and SentencePiece
    BPE / unigram converted to tokenizer.json (with a tokenizer_config.json naming bos/eos/pad)."""
    lines = word_rotations(SAMPLES, rounds=30)
    root = tmp_path_factory.mktemp('tokjson')
    bytelevel = train_bytelevel_bpe(iter(lines), str(root / 'bytelevel' / 'tokenizer.json'), vocab_size=700)
    out = {'bytelevel': (str(root / 'bytelevel'), bytelevel)}
    for kind, sp in tiny_sentencepieces(lines, tmp_path_factory, 400).items():
        text = hf_tokenizer.tokenizer_backend(sp).to_str()
        folder = write_folder(root / kind, text, bos_token='<s>', eos_token='</s>', pad_token='<pad>')
        out[kind] = (folder, load_tokenizer(folder))
    return out


@pytest.mark.parametrize('kind', ['bytelevel', 'bpe', 'unigram'])
def test_ids_agree_with_autotokenizer_and_decode_back(folders, kind):
    folder, tok = folders[kind]
    assert tok.kind == 'tokenizers'
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in SAMPLES + [UNSEEN]:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False).input_ids, text
        if kind == 'bytelevel' or 'im_' not in text:  # SentencePiece's own spacing around chat tokens differs
            assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) \
        if kind != 'bytelevel' else (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)


def test_bytelevel_bpe_has_no_unk_splits_digits_and_keeps_chat_tokens_whole(folders):
    tok = folders['bytelevel'][1]
    assert tok._unk_id is None and tokenizer_stats(tok, [UNSEEN])['unknown_tokens'] == 0
    assert tok.decode(tok.encode(UNSEEN)) == UNSEEN
    digits = [tok.decode([i]) for i in tok.encode('1948 e 2024')]
    assert [d for d in digits if d.strip().isdigit()] == list('19482024')
    for piece in ('<|im_start|>', '<|im_end|>'):
        assert tok.encode(piece) == [tok.special_tokens[piece]]
    assert tok.encode('आदि में') != []  # Devanagari vowel signs stay inside words: fewer tokens than bytes
    assert len(tok.encode(SAMPLES[1])) < len(SAMPLES[1].encode('utf-8')) / 2


def test_description_travels_in_a_checkpoint_and_same_tokenizer_tells_them_apart(folders, tmp_path):
    tok = folders['bytelevel'][1]
    torch.save({'tokenizer': tok.to_dict()}, tmp_path / 'x.pt')
    back = load_tokenizer(torch.load(tmp_path / 'x.pt', weights_only=True)['tokenizer'])
    with open(os.path.join(folders['bytelevel'][0], 'tokenizer.json'), 'rb') as f:
        assert back.to_dict()['tokenizer_json'] == f.read()  # the file's own text, unchanged
    assert same_tokenizer(tok, back) and back.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
    assert not same_tokenizer(tok, folders['bpe'][1]) and not same_tokenizer(folders['bpe'][1], folders['unigram'][1])
    assert not same_tokenizer(tok, load_tokenizer('bytes'))
    # a bytes tokenizer exported as tokenizer.json and read back is the same tokenizer
    hf_tokenizer.write_tokenizer(load_tokenizer('bytes'), str(tmp_path / 'hf'), 64)
    assert same_tokenizer(load_tokenizer(str(tmp_path / 'hf')), load_tokenizer('bytes'))


def test_bos_eos_come_from_the_config_else_from_names_else_a_clear_error(folders, tmp_path):
    text = open(os.path.join(folders['bytelevel'][0], 'tokenizer.json'), encoding='utf-8').read()
    tok = load_tokenizer(write_folder(tmp_path / 'a', text, bos_token='<|im_start|>', eos_token='<|im_end|>'))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (3, 4, 2)
    (tmp_path / 'a' / 'tokenizer_config.json').unlink()  # older folders: special_tokens_map.json, dicts
    (tmp_path / 'a' / 'special_tokens_map.json').write_text(json.dumps({'eos_token': {'content': '<|im_end|>'}}))
    assert (load_tokenizer(str(tmp_path / 'a')).bos_id, load_tokenizer(str(tmp_path / 'a')).eos_id) == (0, 4)
    data = json.loads(text)
    data['added_tokens'] = [t for t in data['added_tokens'] if t['content'] not in ('<s>', '</s>')]
    data['post_processor'] = None
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_tokenizer(write_folder(tmp_path / 'b', json.dumps(data)))
    with pytest.raises(ValueError, match="not in the tokenizer"):
        load_tokenizer(write_folder(tmp_path / 'c', text, bos_token='<nope>', eos_token='</s>'))
    (tmp_path / 'bad.json').write_text('{"model": 1}')
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        load_tokenizer(str(tmp_path / 'bad.json'))
    with pytest.raises(ValueError, match="without 'tiktoken:'"):
        load_tokenizer(f"tiktoken:{folders['bytelevel'][0]}/tokenizer.json")


def test_prepare_train_sample_export_keeps_the_ids_of_autotokenizer(folders, tmp_path):
    """prepare.py --tokenizer FOLDER -> train.py -> sample -> export.py -> AutoTokenizer: the same ids all along."""
    folder, tok = folders['bytelevel']
    with open(tmp_path / 'corpus.jsonl', 'w', encoding='utf-8') as f:
        for n in range(40):
            f.write(json.dumps({'text': SAMPLES[n % len(SAMPLES)]}, ensure_ascii=False) + '\n')
    data = tmp_path / 'data'
    prep.main(['--input', str(tmp_path / 'corpus.jsonl'), '--tokenizer', folder, '--out', str(data),
               '--val_fraction', '0.1'])
    meta = json.loads((data / 'meta.json').read_text())
    assert meta['tokenizer']['kind'] == 'tokenizers' and meta['tokenizer']['path'] == 'tokenizer.json'
    assert (data / 'tokenizer.json').read_bytes() == open(os.path.join(folder, 'tokenizer.json'), 'rb').read()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    expected = [i for n in range(40) if not is_val_document(n, 0.1) for i in
                [tok.bos_id] + hf_tok(SAMPLES[n % len(SAMPLES)], add_special_tokens=False).input_ids + [tok.eos_id]]
    assert read_shard(str(data / 'train_000000.bin')).tolist() == expected

    out = tmp_path / 'out'
    train.main(['--model=tiny', '--device=cpu', '--dtype=float32', '--batch_size=2', '--block_size=32',
                '--eval_iters=1', '--max_iters=2', '--warmup_iters=1', '--log_interval=1',
                f'--data_dir={data}', f'--out_dir={out}'])
    model, back, _ = load_model(str(out))
    assert back.kind == 'tokenizers' and same_tokenizer(back, tok)
    record = sample_prompts(model, back, ['No princípio'], max_new_tokens=5, progress=False)[0]
    assert record['text'] == back.decode(record['tokens']) and len(record['tokens']) <= 5

    export.export(str(out), str(tmp_path / 'hf'))
    assert (tmp_path / 'hf' / 'tokenizer.json').read_bytes() == (data / 'tokenizer.json').read_bytes()
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'hf'))
    for text in SAMPLES:
        assert exported(text).input_ids == [tok.bos_id] + tok.encode(text)  # <bos> first, as in training
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf')).eval()
    ids = torch.tensor([tok.encode(SAMPLES[0], bos=True)[:32]])
    with torch.no_grad():
        assert torch.allclose(hf_model(ids).logits, model(ids)[0], atol=1e-4)

    # and back: a folder with only tokenizer.json loads with its tokenizer, and fine-tuning from it
    # on data of another tokenizer is refused
    (tmp_path / 'hf' / 'tokenizer_config.json').unlink()
    imported, tok2 = load_hf(str(tmp_path / 'hf'))
    assert tok2.kind == 'tokenizers' and same_tokenizer(tok2, tok)
    other = tmp_path / 'other'
    prep.main(['--input', str(tmp_path / 'corpus.jsonl'), '--tokenizer', folders['bpe'][0], '--out', str(other)])
    with pytest.raises(SystemExit, match='another tokenizer'):
        train.main(['--model=tiny', '--device=cpu', '--dtype=float32', '--batch_size=2', '--block_size=32',
                    '--max_iters=1', f'--data_dir={other}', f'--out_dir={tmp_path / "tuned"}',
                    f'--init_from={tmp_path / "hf"}'])


def test_prepare_trains_a_bytelevel_bpe(tmp_path):
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text('\n\n'.join(word_rotations(SAMPLES, rounds=10)), encoding='utf-8')
    prep.main(['--input', str(corpus), '--tokenizer', 'train-bytelevel:600', '--out', str(tmp_path / 'out')])
    meta = json.loads((tmp_path / 'out' / 'meta.json').read_text())
    assert meta['tokenizer']['kind'] == 'tokenizers' and meta['vocab_size'] <= 600
    tok = load_tokenizer(meta['tokenizer'], base_dir=str(tmp_path / 'out'))
    assert not (tmp_path / 'out' / 'tokenizer.model').exists()
    ids = np.concatenate([read_shard(str(tmp_path / 'out' / n)) for n in meta['splits']['train']['shards']])
    assert ids.max() < tok.vocab_size and ids[0] == tok.bos_id


def test_tokenizer_py_trains_bytelevel_and_refuses_a_model_path(tmp_path):
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text('\n\n'.join(word_rotations(SAMPLES, rounds=10)), encoding='utf-8')
    run = lambda out: subprocess.run([sys.executable, 'tokenizer.py', '--input', str(corpus), '--vocab_size', '600',  # noqa: E731
                                      '--model_type', 'bytelevel', '--out', str(out)], cwd=ROOT, capture_output=True, text=True)
    done = run(tmp_path / 'tokenizer.json')
    assert done.returncode == 0, done.stderr
    assert load_tokenizer(str(tmp_path / 'tokenizer.json')).kind == 'tokenizers'
    refused = run(tmp_path / 'tokenizer.model')
    assert refused.returncode == 1 and refused.stderr.strip().count('\n') == 0 and '*.json' in refused.stderr
