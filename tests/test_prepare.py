import base64
import errno
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import prepare as prep  # the command; data/ is a namespace package: no __init__.py needed
from mirim.corpus import expand_inputs, PrepareError, read_documents, read_hf_dataset, read_text_file
from mirim.prepare import is_val_document, prepare
from mirim.shards import BatchSampler, load_meta, read_shard, ShardWriter
from mirim.tokenizer import load_tokenizer, train_sentencepiece

DOCUMENTS = [
    "O rato roeu a roupa do rei de Roma.\nE a rainha, com raiva, remendou.",
    "नमस्ते दुनिया। यह एक छोटा सा परीक्षण है।",
    "আমি বাংলায় গান গাই। এটি একটি পরীক্ষা।",
    "你好，世界！这是一个小测试。",
    "Ação, coração, pão: 123 e 4567.",
    "<|im_start|>user\nOlá<|im_end|>",
] * 4


@pytest.fixture(scope='module')
def sentencepiece_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('spm') / 'tokenizer.model')
    train_sentencepiece(iter(DOCUMENTS * 20), path, vocab_size=400)
    return path


def documents_in_split(data_dir, split):
    """Read a split's shards back and cut them into documents at <bos> ... <eos>."""
    meta = load_meta(data_dir)
    tokens = np.concatenate([read_shard(os.path.join(data_dir, n), meta['vocab_size'])
                             for n in meta['splits'][split]['shards']]).tolist()
    tokenizer = load_tokenizer(meta['tokenizer'], base_dir=data_dir)
    documents, start = [], None
    for i, t in enumerate(tokens):  # (tiktoken's <bos> and <eos> are the same id)
        if start is None and t == meta['bos_id']:
            start = i + 1
        elif start is not None and t == meta['eos_id']:
            documents.append(tokenizer.decode(tokens[start:i]))
            start = None
    return documents


def expected_split(documents, val_fraction, seed=1337):
    val = [d for i, d in enumerate(documents) if is_val_document(i, val_fraction, seed)]
    train = [d for i, d in enumerate(documents) if not is_val_document(i, val_fraction, seed)]
    return train, val


def write_text(path, text):
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
    return str(path)


# --- round trips ---

def test_bytes_round_trip_text_to_shards_to_text(tmp_path):
    prepare(DOCUMENTS, 'bytes', str(tmp_path), val_fraction=0.25)
    train, val = expected_split(DOCUMENTS, 0.25)
    assert documents_in_split(str(tmp_path), 'train') == train
    assert documents_in_split(str(tmp_path), 'val') == val


def test_sentencepiece_round_trip_text_to_shards_to_text(tmp_path, sentencepiece_model):
    prepare(DOCUMENTS, sentencepiece_model, str(tmp_path), val_fraction=0.25)
    train, val = expected_split(DOCUMENTS, 0.25)
    assert documents_in_split(str(tmp_path), 'train') == train
    assert documents_in_split(str(tmp_path), 'val') == val


def test_tiktoken_ranks_file_round_trip_text_to_shards_to_text(tmp_path):
    ranks = [bytes([b]) for b in range(256)] + [b'ra', b'de', b' ra']
    (tmp_path / 'tiny.tiktoken').write_bytes(b''.join(base64.b64encode(t) + b' %d\n' % i for i, t in enumerate(ranks)))
    meta = prepare(DOCUMENTS, 'tiktoken:' + str(tmp_path / 'tiny.tiktoken'), str(tmp_path / 'data'), val_fraction=0.25)
    train, val = expected_split(DOCUMENTS, 0.25)
    assert meta['tokenizer']['path'] == 'tokenizer.tiktoken'
    assert documents_in_split(str(tmp_path / 'data'), 'train') == train
    assert documents_in_split(str(tmp_path / 'data'), 'val') == val


def test_tokenizer_file_is_copied_into_the_data_folder(tmp_path, sentencepiece_model):
    meta = prepare(DOCUMENTS, sentencepiece_model, str(tmp_path / 'data'))
    assert meta['tokenizer']['path'] == 'tokenizer.model' and 'model_proto' not in meta['tokenizer']
    with open(sentencepiece_model, 'rb') as a, open(tmp_path / 'data' / 'tokenizer.model', 'rb') as b:
        assert a.read() == b.read()


def test_meta_counts_tokens_bytes_and_documents(tmp_path):
    meta = prepare(DOCUMENTS, 'bytes', str(tmp_path), val_fraction=0.25)
    train, val = expected_split(DOCUMENTS, 0.25)
    for split, docs in (('train', train), ('val', val)):
        text_bytes = sum(len(d.encode('utf-8')) for d in docs)
        starts, ends = sum(d.count('<|im_start|>') for d in docs), sum(d.count('<|im_end|>') for d in docs)
        assert meta['splits'][split]['documents'] == len(docs)
        assert meta['splits'][split]['bytes'] == text_bytes
        # bytes tokenizer: a token per byte, but one for each chat token (12 and 10 bytes), plus <bos> and <eos>
        assert meta['splits'][split]['tokens'] == text_bytes - 11 * starts - 9 * ends + 2 * len(docs)


def test_meta_json_on_disk_matches_the_returned_meta(tmp_path):
    meta = prepare(DOCUMENTS, 'bytes', str(tmp_path))
    assert load_meta(str(tmp_path)) == json.loads(json.dumps(meta))


def test_one_and_two_processes_write_identical_shards(tmp_path, sentencepiece_model):
    documents = DOCUMENTS * 10
    prepare(documents, sentencepiece_model, str(tmp_path / 'one'), val_fraction=0.1, num_proc=1, chunk_chars=200)
    prepare(documents, sentencepiece_model, str(tmp_path / 'two'), val_fraction=0.1, num_proc=2, chunk_chars=200)
    for name in ('train_000000.bin', 'val_000000.bin'):
        with open(tmp_path / 'one' / name, 'rb') as a, open(tmp_path / 'two' / name, 'rb') as b:
            assert a.read() == b.read()


def test_shards_roll_at_shard_tokens(tmp_path):
    meta = prepare(DOCUMENTS, 'bytes', str(tmp_path), val_fraction=0, shard_tokens=500)
    lengths = [len(read_shard(tmp_path / n)) for n in meta['splits']['train']['shards']]
    assert len(lengths) > 2 and all(n == 500 for n in lengths[:-1]) and sum(lengths) == meta['splits']['train']['tokens']


def test_preparing_again_removes_shards_of_the_old_run(tmp_path):
    prepare(DOCUMENTS, 'bytes', str(tmp_path), shard_tokens=300)
    meta = prepare(DOCUMENTS[:3], 'bytes', str(tmp_path), shard_tokens=300)
    on_disk = sorted(n for n in os.listdir(tmp_path) if n.endswith('.bin'))
    assert on_disk == sorted(meta['splits']['train']['shards'] + meta['splits']['val']['shards'])


def test_val_documents_hold_out_exactly_those(tmp_path):
    meta = prepare(DOCUMENTS[:4], 'bytes', str(tmp_path), val_documents=DOCUMENTS[4:6])
    assert documents_in_split(str(tmp_path), 'val') == DOCUMENTS[4:6]
    assert meta['splits']['train']['documents'] == 4


def test_prepared_folder_feeds_the_batch_sampler(tmp_path):
    prepare(DOCUMENTS * 5, 'bytes', str(tmp_path), val_fraction=0.1)
    x, y = BatchSampler(str(tmp_path), 'val', batch_size=2, block_size=32).next_batch()
    assert x.shape == (2, 32) and int(y.max()) < 261


# --- the train / val rule ---

def test_val_is_one_document_per_group_of_round_one_over_fraction():
    val = [i for i in range(1000) if is_val_document(i, 0.01)]
    assert len(val) == 10 and all(i // 100 == n for n, i in enumerate(val))


def test_first_document_is_always_val_so_tiny_corpora_have_a_val_split():
    assert is_val_document(0, 0.005) and not is_val_document(1, 0.005)


def test_seed_changes_which_documents_are_val():
    picks = {seed: [i for i in range(2000) if is_val_document(i, 0.01, seed)] for seed in (1, 2)}
    assert picks[1] != picks[2]


def test_single_document_corpus_is_an_error(tmp_path):
    with pytest.raises(PrepareError, match='went to val, none to train'):
        prepare(["only one"], 'bytes', str(tmp_path / 'out'))
    assert not [n for n in os.listdir(tmp_path / 'out') if n.endswith('.bin') or n == 'meta.json']


# --- reading inputs ---

def test_text_file_documents_are_blank_line_blocks_by_default(tmp_path):
    path = write_text(tmp_path / 'a.txt', "one\ntwo\n\n\nthree\r\n  \nfour\n")
    assert list(read_text_file(path)) == ["one\ntwo", "three", "four"]


def test_doc_per_line_and_file(tmp_path):
    path = write_text(tmp_path / 'a.txt', "\ufeffone\ntwo\n\nthree\n")
    assert list(read_text_file(path, 'line')) == ["one", "two", "three"]
    assert list(read_text_file(path, 'file')) == ["one\ntwo\n\nthree"]


def test_jsonl_gz_records_are_documents(tmp_path):
    with gzip.open(tmp_path / 'a.jsonl.gz', 'wt', encoding='utf-8') as f:
        f.write('{"text": "नमस्ते"}\n\n{"text": "你好"}\n')
    assert list(read_documents([str(tmp_path / 'a.jsonl.gz')])) == ["नमस्ते", "你好"]


def test_folders_and_globs_expand_to_sorted_input_files(tmp_path):
    os.makedirs(tmp_path / 'corpus' / 'sub')
    for name in ('b.txt', 'a.jsonl', 'sub/c.md', 'skip.bin', '.hidden.txt'):
        write_text(tmp_path / 'corpus' / name, '')
    found = expand_inputs([str(tmp_path / 'corpus'), str(tmp_path / 'corpus' / '*.txt')])
    assert [os.path.relpath(p, tmp_path / 'corpus') for p in found] == ['a.jsonl', 'b.txt', 'sub/c.md']


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(PrepareError, match='input not found'):
        expand_inputs([str(tmp_path / 'nope.txt')])


# --- bad input ---

def test_empty_input_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(PrepareError, match='no documents in .*the input is empty'):
        prepare(iter([]), 'bytes', str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')


def test_whitespace_only_documents_count_as_empty(tmp_path):
    with pytest.raises(PrepareError, match='no documents'):
        prepare(["", "  \n "], 'bytes', str(tmp_path / 'out'))


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / 'a.txt').write_bytes(b"ok line\n\nbad \xff byte\nand \xc3 another\n")
    problems = {}
    assert list(read_documents([str(tmp_path / 'a.txt')], problems=problems)) == ["ok line", "bad \ufffd byte\nand \ufffd another"]
    assert problems == {'invalid_utf8': (2, f"{tmp_path / 'a.txt'}:3")}


def test_invalid_utf8_warning_is_saved_in_meta(tmp_path):
    (tmp_path / 'a.txt').write_bytes(b"one\n\ntwo \xff\n")
    problems = {}
    meta = prepare(read_documents([str(tmp_path / 'a.txt')], problems=problems), 'bytes', str(tmp_path / 'out'),
                   problems=problems, val_fraction=0.5)
    assert len(meta['warnings']) == 1 and meta['warnings'][0].startswith('1 line(s) with invalid UTF-8')


def test_jsonl_records_without_the_field_are_skipped_and_counted(tmp_path):
    path = write_text(tmp_path / 'a.jsonl', '{"text": "kept"}\n{"content": "lost", "id": 1}\n{"text": null}\n')
    problems = {}
    assert list(read_documents([path], problems=problems)) == ["kept"]
    count, first = problems['missing_field']
    assert count == 2 and first == f"{path}:2 has no string field 'text'; its fields: content, id"


def test_jsonl_where_every_record_lacks_the_field_is_an_error(tmp_path):
    path = write_text(tmp_path / 'a.jsonl', '{"content": "a"}\n{"content": "b"}\n')
    problems = {}
    with pytest.raises(PrepareError, match=r"2 record\(s\) without the text field.*--text_field"):
        prepare(read_documents([path], problems=problems), 'bytes', str(tmp_path / 'out'), problems=problems)
    assert not os.path.exists(tmp_path / 'out')


def test_unreadable_json_line_is_counted_with_its_line_number(tmp_path):
    path = write_text(tmp_path / 'a.jsonl', '{"text": "a"}\n{"text": "b"\n{"text": "c"}\nnot json\n')
    problems = {}
    assert list(read_documents([path], problems=problems)) == ["a", "c"]
    assert problems['bad_json'] == (2, f"{path}:2")


def test_hf_dataset_without_datasets_package_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, 'datasets', None)  # makes `import datasets` fail
    with pytest.raises(PrepareError, match='needs the `datasets` package.*--input'):
        list(read_hf_dataset('some/dataset'))


def test_hf_dataset_unreachable_hub_says_so(monkeypatch):
    class OfflineDatasets:
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError("Couldn't reach the Hugging Face Hub")
    monkeypatch.setitem(sys.modules, 'datasets', OfflineDatasets)
    with pytest.raises(PrepareError, match='could not read .*ConnectionError.*unreachable.*--input'):
        list(read_hf_dataset('some/dataset'))


# --- command line ---

def test_command_line_trains_a_tokenizer_and_prepares_a_folder(tmp_path):
    os.makedirs(tmp_path / 'corpus')
    write_text(tmp_path / 'corpus' / 'a.txt', '\n\n'.join(DOCUMENTS * 20))
    prep.main(['--input', str(tmp_path / 'corpus'), '--tokenizer', 'train:400', '--out', str(tmp_path / 'out'),
               '--num_proc', '1', '--val_fraction', '0.1'])
    meta = load_meta(str(tmp_path / 'out'))
    assert meta["vocab_size"] == 400 and meta['tokenizer']['kind'] == 'sentencepiece'
    assert meta['splits']['train']['documents'] + meta['splits']['val']['documents'] == len(DOCUMENTS) * 20


def test_command_line_empty_input_exits_with_one_line_error(tmp_path, capsys):
    write_text(tmp_path / 'empty.txt', '\n\n')
    with pytest.raises(SystemExit) as info:
        prep.main(['--input', str(tmp_path / 'empty.txt'), '--tokenizer', 'bytes', '--out', str(tmp_path / 'out')])
    assert str(info.value).startswith('error: no documents in') and not os.path.exists(tmp_path / 'out')


# --- the output folder: never a data set that looks complete and is not (issue 19) ---

def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def corpus(tmp_path):
    """A corpus file big enough for train:400 and for several 200-token shards."""
    return write_text(tmp_path / 'corpus.txt', '\n\n'.join(DOCUMENTS * 20))


def fail_at_shard(monkeypatch, number, error):
    """ShardWriter raises `error` when it is about to finish shard `number` (a .tmp file is open then)."""
    finish = ShardWriter._finish

    def failing(self):
        if len(self.shards) == number:
            raise error
        finish(self)
    monkeypatch.setattr(ShardWriter, '_finish', failing)


def test_bad_setting_leaves_the_old_data_set_untouched_even_with_train_vocab(tmp_path, sentencepiece_model):
    prepare(DOCUMENTS, sentencepiece_model, str(tmp_path / 'out'))
    before = snapshot(tmp_path / 'out')
    for bad in (['--val_fraction', '1.5'], ['--shard_tokens', '0'], ['--num_proc', '0']):
        with pytest.raises(SystemExit) as info:
            prep.main(['--input', corpus(tmp_path), '--tokenizer', 'train:400', '--out', str(tmp_path / 'out'),
                       '--overwrite', *bad])
        assert str(info.value).startswith('error: ') and bad[0][2:] in str(info.value)
        assert snapshot(tmp_path / 'out') == before  # no new tokenizer.model beside the old meta.json


def test_command_line_refuses_a_prepared_folder_without_overwrite(tmp_path):
    prep.main(['--input', corpus(tmp_path), '--tokenizer', 'bytes', '--out', str(tmp_path / 'out')])
    before = snapshot(tmp_path / 'out')
    with pytest.raises(SystemExit) as info:
        prep.main(['--input', corpus(tmp_path), '--tokenizer', 'bytes', '--out', str(tmp_path / 'out'),
                   '--val_fraction', '0.1'])
    assert 'already holds a prepared data set' in str(info.value) and '--overwrite' in str(info.value)
    assert snapshot(tmp_path / 'out') == before


def test_overwrite_with_another_tokenizer_kind_removes_the_old_tokenizer_files(tmp_path, sentencepiece_model):
    out = tmp_path / 'out'
    prep.main(['--input', corpus(tmp_path), '--tokenizer', 'train:400', '--out', str(out)])
    assert {'tokenizer.model', 'tokenizer.vocab'} <= set(os.listdir(out))
    (out / 'notes.txt').write_text('mine')  # not a file of the data set: stays
    prep.main(['--input', corpus(tmp_path), '--tokenizer', 'bytes', '--out', str(out), '--overwrite'])
    assert sorted(os.listdir(out)) == ['meta.json', 'notes.txt', 'train_000000.bin', 'val_000000.bin']
    assert load_meta(str(out))['tokenizer']['kind'] == 'bytes'


def test_preparing_again_with_another_kind_removes_the_old_tokenizer_file(tmp_path, sentencepiece_model):
    prepare(DOCUMENTS, sentencepiece_model, str(tmp_path))
    prepare(DOCUMENTS, 'bytes', str(tmp_path))
    assert not os.path.exists(tmp_path / 'tokenizer.model')


def test_a_folder_holding_just_its_tokenizer_is_prepared_and_keeps_it(tmp_path, sentencepiece_model):
    # tokenizer.py --out data/x/tokenizer.model, then prepare.py --tokenizer data/x/tokenizer.model --out data/x
    os.makedirs(tmp_path / 'x')
    (tmp_path / 'x' / 'tokenizer.model').write_bytes(open(sentencepiece_model, 'rb').read())
    (tmp_path / 'x' / 'tokenizer.vocab').write_text('its pieces')
    prep.main(['--input', corpus(tmp_path), '--tokenizer', str(tmp_path / 'x' / 'tokenizer.model'),
               '--out', str(tmp_path / 'x')])
    assert (tmp_path / 'x' / 'tokenizer.vocab').read_text() == 'its pieces'
    assert load_meta(str(tmp_path / 'x'))['tokenizer']['path'] == 'tokenizer.model'


def test_disk_full_while_writing_shards_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    fail_at_shard(monkeypatch, 3, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(SystemExit) as info:
        prep.main(['--input', corpus(tmp_path), '--tokenizer', 'train:400', '--out', str(tmp_path / 'out'),
                   '--shard_tokens', '200'])
    assert str(info.value) == (f"error: {tmp_path / 'out'}: No space left on device "
                               f"(the partial output in {tmp_path / 'out'} was removed)")
    assert not os.path.exists(tmp_path / 'out')  # no orphan shards, .tmp files or tokenizer


def test_failed_overwrite_leaves_no_data_set_at_all(tmp_path, monkeypatch, sentencepiece_model):
    prepare(DOCUMENTS, sentencepiece_model, str(tmp_path / 'out'))
    (tmp_path / 'out' / 'notes.txt').write_text('mine')
    fail_at_shard(monkeypatch, 1, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(SystemExit):
        prep.main(['--input', corpus(tmp_path), '--tokenizer', 'train:400', '--out', str(tmp_path / 'out'),
                   '--shard_tokens', '200', '--overwrite'])
    assert os.listdir(tmp_path / 'out') == ['notes.txt']  # never old meta.json + new tokenizer.model


def test_failure_in_the_core_removes_every_shard_it_wrote(tmp_path, monkeypatch):
    fail_at_shard(monkeypatch, 2, OSError(errno.EIO, os.strerror(errno.EIO)))
    with pytest.raises(OSError):
        prepare(DOCUMENTS * 5, 'bytes', str(tmp_path), shard_tokens=100)
    assert os.listdir(tmp_path) == []


def test_read_only_output_is_one_line(tmp_path, monkeypatch):
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    monkeypatch.setattr(os, 'makedirs', read_only)
    with pytest.raises(SystemExit) as info:
        prep.main(['--input', corpus(tmp_path), '--tokenizer', 'bytes', '--out', str(tmp_path / 'out')])
    assert str(info.value).startswith(f"error: {tmp_path / 'out'}: Read-only file system")


def test_a_file_that_is_not_a_tokenizer_model_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as info:
        prep.main(['--input', corpus(tmp_path), '--tokenizer', corpus(tmp_path), '--out', str(tmp_path / 'out')])
    assert 'corpus.txt is not a SentencePiece model file' in str(info.value)
    assert not os.path.exists(tmp_path / 'out')


def test_tiktoken_offline_is_one_line(tmp_path, monkeypatch):
    import tiktoken.load
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path / 'cache'))

    def offline(url):
        raise ConnectionError(f"no network for {url}")
    monkeypatch.setattr(tiktoken.load, 'read_file', offline)
    with pytest.raises(SystemExit) as info:
        prep.main(['--input', corpus(tmp_path), '--tokenizer', 'tiktoken:r50k_base', '--out', str(tmp_path / 'out')])
    assert 'could not load tiktoken encoding' in str(info.value) and '\n' not in str(info.value)


def test_ctrl_c_says_interrupted_exits_130_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    fail_at_shard(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(SystemExit) as info:
        prep.main(['--input', corpus(tmp_path), '--tokenizer', 'bytes', '--out', str(tmp_path / 'out'),
                   '--shard_tokens', '200'])
    assert info.value.code == 130 and 'interrupted' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'out')


def test_ctrl_c_and_a_full_disk_in_the_bible_preparation_are_one_line(monkeypatch, capsys):
    from data.biblia import prepare as biblia

    def build_raises(error):
        def build(*args):
            raise error
        monkeypatch.setattr(biblia, 'build', build)
    build_raises(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(SystemExit) as info:
        biblia.main(['--lang', 'pt'])
    assert str(info.value).startswith('error: ') and 'No space left on device' in str(info.value)
    build_raises(KeyboardInterrupt())
    with pytest.raises(SystemExit) as info:
        biblia.main(['--lang', 'pt'])
    assert info.value.code == 130 and 'interrupted' in capsys.readouterr().err


def sigint_as_in_a_terminal():
    """In the child before exec: SIGINT neither ignored nor blocked. A test run started in the
    background by a shell inherits SIGINT ignored (bash does that to background jobs), and so would
    prepare.py: it then never sees the Ctrl-C (this failed the fresh-clone CI run twice)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_sigint_to_the_command_line_is_a_short_message(tmp_path):
    # the input is a pipe: the first chunk is written and prepare.py waits for more when the signal comes
    fifo = str(tmp_path / 'corpus.txt')
    os.mkfifo(fifo)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'prepare.py')
    process = subprocess.Popen([sys.executable, script, '--input', fifo, '--tokenizer', 'bytes',
                                '--out', str(tmp_path / 'out')], stderr=subprocess.PIPE, text=True,
                               preexec_fn=sigint_as_in_a_terminal)
    with open(fifo, 'w') as pipe:
        pipe.write('uma linha de texto\n\n' * 40_000)  # more than one chunk (chunk_chars)
        pipe.flush()
        deadline = time.time() + 120
        while not os.path.exists(tmp_path / 'out' / 'train_000000.bin.tmp') and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and 'Traceback' not in err and 'interrupted' in err, err
    assert not os.path.exists(tmp_path / 'out')


# --- val share (issue 19, item 14) ---

def test_doc_per_file_on_two_files_warns_that_val_holds_half(tmp_path, capsys):
    os.makedirs(tmp_path / 'two')
    write_text(tmp_path / 'two' / 'a.txt', '\n\n'.join(DOCUMENTS))
    write_text(tmp_path / 'two' / 'b.txt', '\n\n'.join(DOCUMENTS))
    prep.main(['--input', str(tmp_path / 'two'), '--doc_per', 'file', '--tokenizer', 'bytes',
               '--out', str(tmp_path / 'out')])
    warning = "val holds 50.0% of the tokens (1 of 2 documents), far more than --val_fraction 0.005"
    assert warning in capsys.readouterr().err
    assert any(w.startswith(warning) for w in load_meta(str(tmp_path / 'out'))['warnings'])


def test_no_val_warning_when_val_is_about_val_fraction(tmp_path):
    meta = prepare(DOCUMENTS * 10, 'bytes', str(tmp_path), val_fraction=0.1)
    assert meta['warnings'] == []


# --- progress (issue 19, item 16) ---

def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capsys):
    prepare(DOCUMENTS, 'bytes', str(tmp_path), val_fraction=0.25)  # capsys: stderr is not a terminal
    assert capsys.readouterr().err == ''


def test_plain_progress_lines_in_a_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr('mirim.prepare.PROGRESS_EVERY', 0)
    prepare(DOCUMENTS * 20, 'bytes', str(tmp_path), chunk_chars=500)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 3 and '\r' not in ''.join(lines)
    for line in lines:
        pattern = rf"tokenizing -> {re.escape(str(tmp_path))}: [\d.]+ MB of text, [\d,]+ tokens, ([\d,]+) tokens/s"
        rate = re.fullmatch(pattern, line).group(1)
        assert int(rate.replace(',', '')) > 0
