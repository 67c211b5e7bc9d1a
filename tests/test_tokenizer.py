import base64
import errno
import os
import pickle
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from conftest import tiny_sentencepieces, word_rotations  # noqa: E402
import tokenizer  # noqa: E402
from mirim.atomic import write_atomic  # noqa: E402
from mirim.tokenizer import load_tokenizer, tokenizer_stats, train_sentencepiece, training_sentences
from tokenizer import read_blocks

SAMPLES = {
    'portuguese': "No princípio criou Deus os céus e a terra. Ação, coração, pão e avó!",
    'hindi': "आदि में परमेश्वर ने आकाश और पृथ्वी की सृष्टि की। क़लम और ज़मीन",
    'bengali': "আদিতে ঈশ্বর আকাশমণ্ডল ও পৃথিবী সৃষ্টি করলেন।",
    'chinese': "起初，神创造天地。地是空虚混沌，渊面黑暗。",
    'emoji': "Bom dia 😀🚀 👩🏽‍💻 🇧🇷",
    'whitespace': "def f(x):\n    return x + 1\n\n\tdone  \n",
}
UNSEEN = "ქართული ენა და ελληνικά γράμματα"  # Georgian and Greek never appear in training


def training_text():
    """A few KB of multilingual lines: each sample with its words in a different order."""
    return word_rotations(SAMPLES.values())


@pytest.fixture(scope='module')
def sp_toks(tmp_path_factory):
    """One tiny BPE and one tiny unigram model, trained once for the whole file."""
    return tiny_sentencepieces(training_text(), tmp_path_factory)


@pytest.fixture
def sp_tok(sp_toks):
    return sp_toks['bpe']


@pytest.fixture(scope='module')
def tiktoken_path(tmp_path_factory):
    """A tiny ranks file: the 256 bytes, then a few merges."""
    ranks = [bytes([b]) for b in range(256)] + [b'de', b'ra', b' a', b'ra ']
    path = tmp_path_factory.mktemp('tiktoken') / 'tiny.tiktoken'
    path.write_bytes(b''.join(base64.b64encode(t) + b' %d\n' % i for i, t in enumerate(ranks)))
    return str(path)


@pytest.fixture(params=['sentencepiece-bpe', 'sentencepiece-unigram', 'tiktoken', 'bytes'])
def any_tok(request, sp_toks, tiktoken_path):
    if request.param.startswith('sentencepiece'):
        return sp_toks[request.param.split('-')[1]]
    return load_tokenizer('tiktoken:' + tiktoken_path if request.param == 'tiktoken' else 'bytes')


@pytest.mark.parametrize('name', SAMPLES)
def test_decode_encode_round_trips_each_script(any_tok, name):
    assert any_tok.decode(any_tok.encode(SAMPLES[name])) == SAMPLES[name]


def test_round_trip_keeps_bos_eos_out_of_the_text(any_tok):
    ids = any_tok.encode(SAMPLES['hindi'], bos=True, eos=True)
    assert ids[0] == any_tok.bos_id and ids[-1] == any_tok.eos_id
    assert any_tok.decode(ids) == SAMPLES['hindi']


@pytest.mark.parametrize('piece', ['<|im_start|>', '<|im_end|>'])
def test_chat_tokens_are_single_ids_inside_text(any_tok, piece):
    ids = any_tok.encode(f"olá{piece}mundo")
    assert any_tok.special_tokens[piece] in ids
    assert any_tok.token_to_id(piece) == any_tok.special_tokens[piece]


@pytest.fixture(params=['sentencepiece-bpe', 'sentencepiece-unigram', 'tiktoken', 'bytes', 'tokenizer.json'])
def every_kind(request, sp_toks, tiktoken_path, tmp_path_factory):
    """any_tok's kinds, and a byte-level BPE tokenizer.json."""
    if request.param != 'tokenizer.json':
        return sp_toks[request.param.split('-')[1]] if request.param.startswith('sentencepiece') else load_tokenizer(
            'tiktoken:' + tiktoken_path if request.param == 'tiktoken' else 'bytes')
    from mirim.tokenizer import train_bytelevel_bpe
    return train_bytelevel_bpe(iter(training_text()), str(tmp_path_factory.mktemp('bl') / 'tokenizer.json'), 400)


@pytest.mark.parametrize('text', ['olá<|im_end|>\n<|im_start|>assistant\nsim', 'fim</s><s> de <|im_start|>'])
def test_encode_without_specials_reads_every_special_token_as_text(every_kind, text):
    ids = every_kind.encode(text, specials=False)
    assert not set(ids) & set(every_kind.special_tokens.values())
    assert every_kind.decode(ids) == text
    assert every_kind.encode_batch([text, 'x'], specials=False) == [ids, every_kind.encode('x', specials=False)]


def test_encode_with_specials_still_finds_the_chat_tokens(every_kind):
    ids = every_kind.encode('a<|im_end|>b')
    assert every_kind.special_tokens['<|im_end|>'] in ids


def test_encode_batch_equals_encode(any_tok):
    texts = list(SAMPLES.values())
    assert any_tok.encode_batch(texts, bos=True) == [any_tok.encode(t, bos=True) for t in texts]


def test_to_dict_then_load_gives_identical_ids(any_tok):
    again = load_tokenizer(any_tok.to_dict())
    for text in SAMPLES.values():
        assert again.encode(text) == any_tok.encode(text)
    assert again.special_tokens == any_tok.special_tokens


def test_to_dict_survives_torch_save_weights_only(any_tok, tmp_path):
    torch.save({'tokenizer': any_tok.to_dict()}, tmp_path / 'ckpt.pt')
    loaded = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['tokenizer']
    assert load_tokenizer(loaded).encode(SAMPLES['bengali']) == any_tok.encode(SAMPLES['bengali'])


def test_pickled_tokenizer_encodes_the_same(any_tok):
    assert pickle.loads(pickle.dumps(any_tok)).encode(SAMPLES['chinese']) == any_tok.encode(SAMPLES['chinese'])


def test_decode_refuses_an_id_outside_the_vocab(any_tok):
    with pytest.raises(ValueError, match='outside'):
        any_tok.decode([any_tok.vocab_size])


def test_sentencepiece_ids_follow_llama_convention(sp_tok):
    assert (sp_tok.token_to_id('<unk>'), sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (0, 1, 2, 3)
    assert sp_tok.special_tokens['<|im_start|>'] == 4


def test_byte_fallback_means_no_unknown_for_an_unseen_script(sp_tok):
    ids = sp_tok.encode(UNSEEN)
    assert 0 not in ids
    assert sp_tok.decode(ids) == UNSEEN


def test_identity_normalization_keeps_full_width_punctuation(sp_tok):
    # NFKC (SentencePiece's default) would turn '，' into ',' and 'ﬁ' into 'fi'
    assert sp_tok.decode(sp_tok.encode("天，地 ﬁ")) == "天，地 ﬁ"


def test_bytes_tokenizer_ids_are_the_utf8_bytes():
    tok = load_tokenizer('bytes')
    assert tok.encode('aé') == [97, 0xC3, 0xA9]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 261)


def test_bytes_decode_replaces_invalid_utf8():
    assert load_tokenizer('bytes').decode([0xC3, 97]) == '\ufffda'


def test_meta_json_form_loads_relative_to_base_dir(sp_tok, tmp_path):
    (tmp_path / 'tokenizer.model').write_bytes(sp_tok.to_dict()['model_proto'])
    meta_form = {k: v for k, v in sp_tok.to_dict().items() if not isinstance(v, bytes)}
    meta_form['path'] = 'tokenizer.model'
    assert load_tokenizer(meta_form, base_dir=str(tmp_path)).encode(UNSEEN) == sp_tok.encode(UNSEEN)


def test_vocab_size_mismatch_is_refused(sp_tok):
    with pytest.raises(ValueError, match='mismatch'):
        load_tokenizer({**sp_tok.to_dict(), 'vocab_size': 999})


def test_unknown_spec_names_the_accepted_forms():
    with pytest.raises(FileNotFoundError, match="tiktoken:NAME"):
        load_tokenizer('no_such_tokenizer')


def test_unknown_tiktoken_name_lists_known_names():
    with pytest.raises(ValueError, match='cl100k_base'):
        load_tokenizer('tiktoken:no_such_encoding')


def test_tiktoken_name_without_cache_or_network_says_how_to_fix(monkeypatch, tmp_path):
    import tiktoken.load
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path))

    def offline(url):
        raise ConnectionError(f"no network for {url}")
    monkeypatch.setattr(tiktoken.load, 'read_file', offline)
    with pytest.raises(RuntimeError, match=r'tiktoken:/path/to/r50k_base\.tiktoken'):
        load_tokenizer('tiktoken:r50k_base')


def test_vocab_too_small_for_byte_fallback_is_refused(tmp_path):
    with pytest.raises(ValueError, match='too small'):
        train_sentencepiece(iter(['abc']), str(tmp_path / 't.model'), vocab_size=200)


def test_missing_input_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothing_here'):
        train_sentencepiece([str(tmp_path / 'nothing_here*.txt')], str(tmp_path / 't.model'), vocab_size=400)


def test_long_lines_are_cut_below_sentencepiece_limit():
    sentences = list(training_sentences(['x' * 5000 + '\nshort'], max_bytes=4192))
    assert all(len(s.encode()) <= 4192 for s in sentences)
    assert ''.join(sentences) == 'x' * 5000 + 'short'


def test_training_keeps_the_lines_of_a_document_together():
    assert list(training_sentences(['E disse:\nHaja luz.\n'])) == ['E disse:\nHaja luz.\n']


def test_stats_of_bytes_tokenizer_are_one_byte_per_token():
    stats = tokenizer_stats('bytes', ['olá mundo', 'दो शब्द'])
    assert stats['bytes_per_token'] == 1.0
    assert stats['words'] == 4 and stats['tokens_per_word'] == stats['bytes'] / 4


def test_command_line_trains_and_prints_held_out_comparison(tmp_path):
    (tmp_path / 'corpus.txt').write_text('\n\n'.join(training_text()), encoding='utf-8')
    root = os.path.join(os.path.dirname(__file__), '..')
    result = subprocess.run([sys.executable, os.path.join(root, 'tokenizer.py'), '--input', str(tmp_path / '*.txt'),
                             '--vocab_size', '400', '--out', str(tmp_path / 'x' / 'tokenizer.model')],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert 'fewer tokens than raw bytes' in result.stdout
    assert load_tokenizer(str(tmp_path / 'x' / 'tokenizer.model')).vocab_size == 400


def test_command_line_says_in_one_line_why_training_failed(tmp_path):
    (tmp_path / 'small.txt').write_text('um texto curto demais para tantas peças\n', encoding='utf-8')
    root = os.path.join(os.path.dirname(__file__), '..')
    tokenizer_py = os.path.join(root, 'tokenizer.py')
    too_big = subprocess.run([sys.executable, tokenizer_py, '--input', str(tmp_path / 'small.txt'),
                              '--vocab_size', '8192', '--out', str(tmp_path / 'x.model')],
                             capture_output=True, text=True, timeout=60)
    missing = subprocess.run([sys.executable, tokenizer_py, '--input', str(tmp_path / 'nothing-*.txt'),
                              '--out', str(tmp_path / 'y.model')], capture_output=True, text=True, timeout=60)
    assert too_big.returncode == 1 and 'Traceback' not in too_big.stderr
    assert 'could not train a 8192-piece tokenizer' in too_big.stderr and 'too high' in too_big.stderr
    assert missing.returncode == 1 and 'Traceback' not in missing.stderr
    assert 'no input file matches' in missing.stderr
    assert not (tmp_path / 'x.model').exists() and not (tmp_path / 'y.model').exists()


# --- issue 19 ---

def test_a_file_that_is_not_a_sentencepiece_model_is_named(tmp_path):
    (tmp_path / 'notes.txt').write_text('not a model')
    with pytest.raises(ValueError, match=r'notes\.txt is not a SentencePiece model file'):
        load_tokenizer(str(tmp_path / 'notes.txt'))


def test_latin1_input_is_read_with_a_warning_naming_the_file(tmp_path, capsys):
    (tmp_path / 'latin1.txt').write_bytes('café crème\n\nolá coração\n'.encode('latin-1'))
    (tmp_path / 'utf8.txt').write_text('café crème\n', encoding='utf-8')
    assert list(read_blocks([str(tmp_path / 'utf8.txt')])) == ['café crème']
    assert capsys.readouterr().err == ''
    assert list(read_blocks([str(tmp_path / 'latin1.txt')])) == ['caf\ufffd cr\ufffdme', 'ol\ufffd cora\ufffd\ufffdo']
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'latin1.txt'}: 2 line(s) are not valid UTF-8 (first: line 1)" in err
    assert 'iconv' in err and err.count('\n') == 1


def test_read_blocks_keeps_crlf_files_as_before(tmp_path):
    (tmp_path / 'a.txt').write_bytes(b'one\r\ntwo\r\n\r\nthree\r\n')
    assert list(read_blocks([str(tmp_path / 'a.txt')])) == ['one\ntwo', 'three']


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capsys):
    train_sentencepiece(iter(training_text()), str(tmp_path / 't.model'), vocab_size=400)  # capsys: not a terminal
    assert capsys.readouterr().err == ''


def test_write_atomic_leaves_no_temp_file_when_the_disk_is_full(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'fsync', full)
    with pytest.raises(OSError, match='No space left'):
        write_atomic(str(tmp_path / 'meta.json'), b'{}')
    assert os.listdir(tmp_path) == []
