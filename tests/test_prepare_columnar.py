"""Parquet, Arrow and datasets.save_to_disk inputs of data/prepare.py and data/prepare_chat.py: the same
shards as the same text given as JSONL; bad inputs are one-line errors."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import prepare as prep  # noqa: E402
from data import prepare_chat  # noqa: E402

pa = pytest.importorskip('pyarrow')
pq = pytest.importorskip('pyarrow.parquet')

TEXTS = [f"Documento {n}: No princípio criou Deus os céus. आदि में {n} 起初 🙂" for n in range(250)]


def write_arrow_stream(path, table):  # the format datasets.save_to_disk writes
    with pa.OSFile(str(path), 'wb') as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=40)


def save_to_disk(folder, table, pieces=2):
    """A datasets.save_to_disk Dataset folder, built with pyarrow alone (datasets' layout)."""
    os.makedirs(folder, exist_ok=True)
    step = -(-table.num_rows // pieces)
    names = [f'data-{k:05d}-of-{pieces:05d}.arrow' for k in range(pieces)]
    for k, name in enumerate(names):
        write_arrow_stream(os.path.join(folder, name), table.slice(k * step, step))
    with open(os.path.join(folder, 'state.json'), 'w') as f:
        json.dump({'_data_files': [{'filename': n} for n in names], '_split': None}, f)
    with open(os.path.join(folder, 'dataset_info.json'), 'w') as f:
        json.dump({'features': {}}, f)


@pytest.fixture
def inputs(tmp_path):
    table = pa.table({'id': list(range(len(TEXTS))), 'body': TEXTS})
    with open(tmp_path / 'c.jsonl', 'w', encoding='utf-8') as f:
        for n, text in enumerate(TEXTS):
            f.write(json.dumps({'id': n, 'body': text}, ensure_ascii=False) + '\n')
    os.makedirs(tmp_path / 'pq')
    pq.write_table(table.slice(0, 100), tmp_path / 'pq' / 'a.parquet', row_group_size=30)
    pq.write_table(table.slice(100), tmp_path / 'pq' / 'b.parquet', row_group_size=30)
    with pa.OSFile(str(tmp_path / 'file.arrow'), 'wb') as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=64)
    write_arrow_stream(tmp_path / 'stream.arrow', table)
    save_to_disk(tmp_path / 'saved', table)
    os.makedirs(tmp_path / 'dict')
    save_to_disk(tmp_path / 'dict' / 'train', table)
    save_to_disk(tmp_path / 'dict' / 'test', table.slice(0, 5))
    (tmp_path / 'dict' / 'dataset_dict.json').write_text(json.dumps({'splits': ['train', 'test']}))
    return tmp_path


def shards(out):
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out)) if name.endswith('.bin')}


@pytest.mark.parametrize('given', ['pq', 'pq/*.parquet', 'file.arrow', 'stream.arrow', 'saved', 'dict'])
def test_columnar_inputs_give_the_shards_of_the_same_jsonl(inputs, given):
    args = ['--text_field', 'body', '--tokenizer', 'bytes', '--val_fraction', '0.05']
    prep.main(['--input', str(inputs / 'c.jsonl'), '--out', str(inputs / 'from_jsonl'), *args])
    prep.main(['--input', str(inputs / given), '--out', str(inputs / 'from_columnar'), *args])
    assert shards(inputs / 'from_columnar') == shards(inputs / 'from_jsonl')
    meta = json.loads((inputs / 'from_columnar' / 'meta.json').read_text())
    assert meta['splits']['train']['documents'] + meta['splits']['val']['documents'] == len(TEXTS)


def test_chat_conversations_from_parquet_match_jsonl(tmp_path):
    conversations = [{'messages': [{'role': 'user', 'content': f'Olá {n}?'},
                                   {'role': 'assistant', 'content': f'Tudo bem {n}! 🙂'}]} for n in range(30)]
    with open(tmp_path / 'c.jsonl', 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(c, ensure_ascii=False) + '\n' for c in conversations)
    pq.write_table(pa.Table.from_pylist(conversations), tmp_path / 'c.parquet', row_group_size=7)
    for name in ('c.jsonl', 'c.parquet'):
        prepare_chat.main(['--input', str(tmp_path / name), '--tokenizer', 'bytes', '--out', str(tmp_path / name[2:])])
    assert shards(tmp_path / 'parquet') == shards(tmp_path / 'jsonl')


@pytest.mark.parametrize('make,args,says', [
    (lambda d: pq.write_table(pa.table({'t': ['x']}), d / 'corpus.txt'), [], 'looks like a Parquet file'),
    (lambda d: write_arrow_stream(d / 'corpus.jsonl', pa.table({'t': ['x']})), [], 'looks like an Arrow stream'),
    (lambda d: (d / 'corpus.txt').write_bytes('texto'.encode('utf-16')), [], 'looks like UTF-16 LE text'),
    (lambda d: pq.write_table(pa.table({'t': ['x']}), d / 'corpus.parquet'), [], "no column 'text'; its columns: t"),
    (lambda d: (d / 'corpus.parquet').write_text('not parquet'), [], 'not a readable Parquet file'),
    (lambda d: save_to_disk(d / 'corpus', pa.table({'text': ['x']})), ['--hf_split', 'validation'], None),
])
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, make, args, says):
    make(tmp_path)
    given = next(p for p in tmp_path.iterdir() if p.name.startswith('corpus'))
    if says is None:  # a Dataset ignores --hf_split; a DatasetDict without the split is refused
        os.makedirs(tmp_path / 'dict')
        os.rename(given, tmp_path / 'dict' / 'train')
        (tmp_path / 'dict' / 'dataset_dict.json').write_text(json.dumps({'splits': ['train']}))
        given, says = tmp_path / 'dict', "without a split 'validation'; its splits: train"
    with pytest.raises(SystemExit) as e:
        prep.main(['--input', str(given), '--tokenizer', 'bytes', '--out', str(tmp_path / 'out'), *args])
    assert says in str(e.value) and '\n' not in str(e.value)
    assert not (tmp_path / 'out').exists()


def test_chat_input_that_is_not_conversations_data_is_refused(tmp_path):
    pq.write_table(pa.table({'t': ['x']}), tmp_path / 'c.txt')
    with pytest.raises(SystemExit, match='looks like a Parquet file'):
        prepare_chat.main(['--input', str(tmp_path / 'c.txt'), '--tokenizer', 'bytes', '--out', str(tmp_path / 'o')])


# --- --hf_dataset: the `datasets` package, when it is installed, with data_files and local files

def hf_prepare(inputs, *hf_args, out='from_hf'):
    prep.main([*hf_args, '--text_field', 'body', '--tokenizer', 'bytes', '--val_fraction', '0.05',
               '--out', str(inputs / out)])


@pytest.mark.parametrize('hf_args', [['--hf_dataset', 'parquet', '--data_files', 'pq/*.parquet'],
                                     ['--hf_dataset', 'parquet', '--data_files', 'pq/a.parquet', 'pq/b.parquet'],
                                     ['--hf_dataset', 'json', '--data_files', 'c.jsonl'],
                                     ['--hf_dataset', 'c.jsonl']])
def test_hf_dataset_with_data_files_gives_the_shards_of_input(inputs, monkeypatch, hf_args):
    pytest.importorskip('datasets')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_CACHE', str(inputs / 'hf_cache'))  # nothing written into the user's cache
    monkeypatch.chdir(inputs)  # relative data files and globs, as typed on a command line
    hf_prepare(inputs, '--input', str(inputs / 'c.jsonl'), out='from_jsonl')
    hf_prepare(inputs, *hf_args)
    assert shards(inputs / 'from_hf') == shards(inputs / 'from_jsonl')


def test_hf_dataset_data_files_that_match_nothing_is_one_line(inputs, monkeypatch):
    pytest.importorskip('datasets')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_CACHE', str(inputs / 'hf_cache'))
    with pytest.raises(SystemExit) as e:
        hf_prepare(inputs, '--hf_dataset', 'parquet', '--data_files', str(inputs / 'nothing' / '*.parquet'))
    assert "could not read Hugging Face dataset 'parquet'" in str(e.value) and '\n' not in str(e.value)
    assert not (inputs / 'from_hf').exists()


@pytest.mark.parametrize('hf_args', [['--hf_dataset', 'parquet', '--data_files', 'pq/*.parquet'],
                                     ['--hf_dataset', 'pq/a.parquet'], ['--hf_dataset', 'some/dataset']])
def test_hf_dataset_without_the_datasets_package_is_one_line(inputs, monkeypatch, hf_args):
    monkeypatch.setitem(sys.modules, 'datasets', None)  # makes `import datasets` fail, installed or not
    monkeypatch.chdir(inputs)
    with pytest.raises(SystemExit) as e:
        hf_prepare(inputs, *hf_args)
    message = str(e.value)
    assert 'pip install datasets' in message and '--input' in message and '\n' not in message
    assert not (inputs / 'from_hf').exists()


def test_hf_dataset_on_a_saved_dataset_points_to_input(inputs):
    with pytest.raises(SystemExit, match='save_to_disk folder: pass it with --input'):
        hf_prepare(inputs, '--hf_dataset', str(inputs / 'saved'))
    assert not (inputs / 'from_hf').exists()


def test_data_files_go_with_hf_dataset(inputs):
    with pytest.raises(SystemExit, match='--data_files goes with --hf_dataset'):
        hf_prepare(inputs, '--input', str(inputs / 'c.jsonl'), '--data_files', str(inputs / 'c.jsonl'))
