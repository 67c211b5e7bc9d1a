"""Text that is not clean text, and files named twice (issue 30, classes 6 and 7): each is decided in one
place (the tokenizer's encode, the one JSONL reader, the input expansion), so every command that reads
text gets the same clear line."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mirim.corpus import PrepareError, expand_inputs, jsonl_records  # noqa: E402
from mirim.tokenizer import load_tokenizer  # noqa: E402


@pytest.mark.parametrize('spec', ['bytes', {'kind': 'bytes', 'special_tokens': ['<s>', '</s>', '<pad>', '<|im_end|>']}])
def test_a_lone_surrogate_is_one_clear_error_from_every_tokenizer(spec):
    tok = load_tokenizer(spec)
    for text in ('ab\ud800c', '\udfff'):
        with pytest.raises(ValueError, match='lone surrogate'):
            tok.encode(text)
        with pytest.raises(ValueError, match='lone surrogate'):
            tok.encode_batch(['fine', text])


def test_a_lone_surrogate_in_sentencepiece_is_the_same_error_not_a_crash_inside_it(tmp_path):
    from mirim.tokenizer import train_sentencepiece
    tok = train_sentencepiece(iter(['o gato e o rato'] * 200), str(tmp_path / 'tokenizer.model'), vocab_size=280)
    with pytest.raises(ValueError, match='lone surrogate'):
        tok.encode('o gato \ud83d')


def test_jsonl_escapes_that_are_no_text_name_the_file_and_line(tmp_path):
    path = tmp_path / 'x.jsonl'
    path.write_text('{"text": "ok"}\n{"text": "a\\ud800b"}\n')  # the escape, as JSON writes it
    with pytest.raises(PrepareError, match=r'x.jsonl:2: .*lone surrogate'):
        list(jsonl_records(str(path)))
    nested = tmp_path / 'y.jsonl'  # deep inside a record: a chat message
    nested.write_text('{"messages": [{"role": "user", "content": "\\udc80"}]}\n')
    with pytest.raises(ValueError, match=r'y.jsonl:1: .*lone surrogate'):
        list(jsonl_records(str(nested), ValueError))


def test_a_byte_order_mark_is_not_part_of_the_first_record_or_prompt(tmp_path):
    path = tmp_path / 'bom.jsonl'
    path.write_bytes('\ufeff{"text": "olá"}\n'.encode('utf-8'))
    assert [r for _, r in jsonl_records(str(path))] == [{'text': 'olá'}]
    import sample
    prompts = tmp_path / 'prompts.txt'
    prompts.write_bytes('\ufeffNo princípio\nE disse\n'.encode('utf-8'))
    assert sample.read_prompts(f'FILE:{prompts}') == ['No princípio', 'E disse']


def test_a_classifier_file_with_a_bad_escape_is_one_line_naming_its_line(tmp_path):
    train = tmp_path / 'train.jsonl'
    train.write_text('{"text": "a", "label": "x"}\n{"text": "b\\ud800", "label": "y"}\n')
    process = subprocess.run([sys.executable, os.path.join(ROOT, 'classify.py'), f'--train_file={train}',
                              f'--test_file={train}', f'--out_dir={tmp_path / "out"}', '--init_from=nowhere'],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert process.returncode != 0 and 'Traceback' not in process.stderr
    assert 'train.jsonl:2' in process.stderr and 'lone surrogate' in process.stderr


def test_a_file_named_twice_is_read_once(tmp_path, monkeypatch):
    (tmp_path / 'a.txt').write_text('um\n')
    (tmp_path / 'b.txt').write_text('dois\n')
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(['a.txt', './a.txt', str(tmp_path / 'a.txt'), 'b.txt']) == ['a.txt', 'b.txt']


def test_a_symlink_loop_does_not_read_a_file_many_times(tmp_path):
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    (corpus / 'text.txt').write_text('um\n')
    os.symlink(corpus, corpus / 'loop')  # corpus/loop/loop/loop/... is corpus again
    found = expand_inputs([str(corpus / '**' / '*.txt')])
    assert len(found) == 1 and os.path.realpath(found[0]) == str((corpus / 'text.txt').resolve())
    assert len(expand_inputs([str(corpus)])) == 1  # a folder: os.walk does not follow the link
