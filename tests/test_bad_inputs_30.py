"""Issue 30, classes 8-10: each input below is one line naming the file (or the setting), decided in the one place
that reads it; each class is tried on at least two cases, one of them not in the issue's list."""
import gzip
import json
import os
import socket
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mirim import shards  # noqa: E402
from mirim.atomic import claim_folder  # noqa: E402
from mirim.configurator import configure  # noqa: E402
from mirim.corpus import PrepareError, read_text_file  # noqa: E402
from mirim.hf import config_from_hf, read_hf_tensors  # noqa: E402
from mirim.llm import Client, Fatal  # noqa: E402
from mirim.out_dir import claim_out_dir  # noqa: E402
from mirim.shards import BatchSampler, ShardError  # noqa: E402


def data_dir(root, vocab_size=300):
    """A data set of one train shard (two when asked), as data/prepare.py writes one."""
    names = ['train_000000.bin', 'train_000001.bin']
    for name in names:
        shards.write_shard(os.path.join(root, name), np.arange(100) % vocab_size, vocab_size)
    shards.write_meta(root, {'vocab_size': vocab_size, 'splits': {'train': {'tokens': 200, 'shards': names}}})
    return str(root)


# --- class 8: a shard path that cannot be read is a ShardError naming it (mirim/shards.read_shard)

@pytest.mark.parametrize('make', ['directory', 'symlink loop', 'missing', 'unreadable'])
def test_a_shard_that_cannot_be_read_is_a_shard_error_naming_it(tmp_path, make):
    root = data_dir(tmp_path)
    path = os.path.join(root, 'train_000001.bin')
    os.remove(path)
    if make == 'directory':
        os.mkdir(path)
    elif make == 'symlink loop':
        os.symlink(path, path)
    elif make == 'unreadable':
        if os.geteuid() == 0:
            pytest.skip("root reads every file")
        shards.write_shard(path, np.arange(100), 300)
        os.chmod(path, 0)
    with pytest.raises(ShardError, match=r'train_000001\.bin: cannot be read as a shard'):
        BatchSampler(root, 'train', batch_size=2, block_size=8)


# --- class 8 and 10: meta.json that is not what data/prepare.py writes (mirim/shards.load_meta)

@pytest.mark.parametrize('text, message', [
    ('[1, 2, 3]', 'holds a JSON list, not the object'),                        # the case
    ('"tokens"', 'holds a JSON str, not the object'),
    ('{"vocab_size": "300", "splits": {}}', "'vocab_size' is '300', not a positive whole number"),  # class 10
    ('{"vocab_size": true, "splits": {}}', "'vocab_size' is True"),
    ('{"vocab_size": 300, "splits": ["train"]}', "'splits' is not an object of splits"),
])
def test_meta_json_of_another_shape_names_the_file(tmp_path, text, message):
    (tmp_path / 'meta.json').write_text(text)
    with pytest.raises(ShardError, match=rf"meta\.json: {message}"):
        shards.load_meta(str(tmp_path))


def test_meta_json_that_is_a_folder_names_it(tmp_path):
    os.mkdir(tmp_path / 'meta.json')
    with pytest.raises(ShardError, match=r'meta\.json: cannot be read'):
        shards.load_meta(str(tmp_path))


# --- class 8: a cut or damaged Hugging Face weights file (mirim/hf.read_hf_tensors)

def test_a_cut_model_safetensors_is_one_line_naming_it(tmp_path):
    from safetensors.torch import save_file
    save_file({'w': torch.zeros(64)}, str(tmp_path / 'model.safetensors'))
    data = (tmp_path / 'model.safetensors').read_bytes()
    (tmp_path / 'model.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r'model\.safetensors cannot be read \(cut short or damaged'):
        read_hf_tensors(str(tmp_path))


def test_a_cut_pytorch_model_bin_is_one_line_naming_it(tmp_path):
    torch.save({'w': torch.zeros(64)}, tmp_path / 'pytorch_model.bin')
    data = (tmp_path / 'pytorch_model.bin').read_bytes()
    (tmp_path / 'pytorch_model.bin').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r'pytorch_model\.bin cannot be read'):
        read_hf_tensors(str(tmp_path))


# --- class 10: an HF config.json value of the wrong type names the file and key (mirim/hf.config_from_hf)

HF = {'model_type': 'llama', 'vocab_size': 300, 'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2,
      'num_attention_heads': 4}


@pytest.mark.parametrize('change, message', [
    ({'num_hidden_layers': '2'}, "'num_hidden_layers' is '2', not a positive whole number"),   # the case
    ({'num_hidden_layers': 2.5}, "'num_hidden_layers' is 2.5"),
    ({'hidden_size': None}, "'hidden_size' is None"),
    ({'rms_norm_eps': '1e-6'}, "'rms_norm_eps' is '1e-6', not a positive number"),
    ({'vocab_size': ...}, "no 'vocab_size'"),
])
def test_hf_config_of_a_wrong_type_names_file_and_key(change, message):
    hf = {k: v for k, v in {**HF, **change}.items() if v is not ...}
    with pytest.raises(ValueError, match=rf"^hf/config\.json: {message}"):
        config_from_hf(hf, 'hf/config.json')


def test_hf_config_that_is_no_object_names_the_file():
    with pytest.raises(ValueError, match=r"hf/config\.json: holds a JSON list"):
        config_from_hf([HF], 'hf/config.json')
    assert config_from_hf(HF, 'hf/config.json').n_layer == 2


# --- class 8: a cut or damaged .gz corpus is a PrepareError naming it (mirim/corpus.read_lines)

def test_a_cut_gz_corpus_names_the_file(tmp_path):
    path = str(tmp_path / 'corpus.txt.gz')
    with gzip.open(path, 'wt') as f:
        f.write(''.join(f"line {i} of a corpus {os.urandom(20).hex()}\n" for i in range(3000)))
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])
    with pytest.raises(PrepareError, match=r'corpus\.txt\.gz: the compressed file ends early, after line \d+'):
        list(read_text_file(path, 'line', {}))


def test_a_damaged_gz_corpus_and_a_folder_name_the_file(tmp_path):
    path = str(tmp_path / 'corpus.txt.gz')
    with gzip.open(path, 'wt') as f:
        f.write('some text\n' * 100)
    data = bytearray(open(path, 'rb').read())
    data[-8] ^= 0xff  # its CRC: BadGzipFile at the end
    open(path, 'wb').write(bytes(data))
    with pytest.raises(PrepareError, match=r'corpus\.txt\.gz: cannot be read'):
        list(read_text_file(path, 'line', {}))
    os.mkdir(tmp_path / 'folder.txt')
    with pytest.raises(PrepareError, match=r'folder\.txt: cannot be read \(Is a directory\)'):
        list(read_text_file(str(tmp_path / 'folder.txt'), 'line', {}))


# --- class 8: data/synth.py's language folder and prompts file

def synth_main(argv):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data'))
    import synth
    return synth.main(argv + ['--base_url=http://127.0.0.1:9/v1', '--model=m', '--retries=0'])


@pytest.mark.parametrize('words, message', [
    (None, r'words\.json not found: a --lang folder holds prompt\.txt, words\.json'),   # the case
    ('[1, 2]', r'words\.json: not an object of word lists'),
    ('{"noun": ', r'words\.json: not valid JSON'),
])
def test_synth_language_folder_names_the_file(tmp_path, words, message):
    lang = tmp_path / 'lang'
    lang.mkdir()
    (lang / 'prompt.txt').write_text('Write about {noun}.')
    if words is not None:
        (lang / 'words.json').write_text(words)
    with pytest.raises(SystemExit, match=message):
        synth_main(['--lang', str(lang), '--out', str(tmp_path / 'out.jsonl')])


@pytest.mark.parametrize('text, message', [
    ('{"prompt": "a"}\nnot json\n', r'prompts\.jsonl:2: not valid JSON'),     # the case
    ('{"prompt": "a"}\n[1, 2]\n', r'prompts\.jsonl:2: not a prompt record'),
])
def test_synth_prompts_file_names_file_and_line(tmp_path, text, message):
    (tmp_path / 'prompts.jsonl').write_text(text)
    with pytest.raises(SystemExit, match=message):
        synth_main(['--prompts', str(tmp_path / 'prompts.jsonl'), '--out', str(tmp_path / 'out.jsonl')])


# --- class 9: an endpoint that is down stops the run with one line (mirim/llm.Client)

def closed_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]  # nothing listens there once it is closed


def test_a_down_endpoint_is_fatal_naming_it():
    url = f'http://127.0.0.1:{closed_port()}/v1'
    client = Client(url, 'm', retries=1, backoff=0.001)
    with pytest.raises(Fatal, match=rf'cannot reach {url} \(Connection refused\) after 2 tries'):
        client.ask('hello')
    with pytest.raises(Fatal, match=rf'cannot reach {url}'):
        Client(url, '').default_model()


def test_judge_and_synth_against_a_down_endpoint_say_so(tmp_path):
    import judge
    url = f'http://127.0.0.1:{closed_port()}/v1'
    samples = tmp_path / 'samples.jsonl'
    samples.write_text(json.dumps({'prompt': 'p', 'text': 'uma historia'}) + '\n')
    with pytest.raises(Fatal, match='cannot reach'):  # judge.py's __main__ turns it into one line, exit 1
        judge.main([f'--samples={samples}', f'--base_url={url}', '--model=j', '--retries=0'])
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data'))
    import synth
    lang = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'synth', 'pt')
    with pytest.raises(SystemExit, match='synth.py: error: cannot reach'):
        synth.main(['--lang', lang, '--n', '2', f'--base_url={url}', '--model=m', '--retries=0',
                    '--out', str(tmp_path / 'stories.jsonl')])


def test_an_endpoint_that_answers_is_not_fatal_when_a_later_request_cannot_connect():
    client = Client('http://127.0.0.1:9/v1', 'm', retries=0)
    client.reached = True  # it answered before: a connection that fails now is one failed request, retried later
    with pytest.raises(OSError):
        client.ask('hello')


# --- class 10: unclear lines

@pytest.mark.parametrize('out_dir', ['', '  '])
def test_an_empty_out_dir_says_so(out_dir):
    with pytest.raises(ValueError, match='^out_dir is empty'):
        claim_out_dir(out_dir, resume=False)


@pytest.mark.parametrize('make', ['file', 'symlink to a file'])
def test_a_dest_that_is_a_file_is_named(tmp_path, make):
    (tmp_path / 'plain.txt').write_text('x')
    dest = tmp_path / 'plain.txt'
    if make == 'symlink to a file':
        os.symlink(dest, tmp_path / 'link')
        dest = tmp_path / 'link'
    with pytest.raises(ValueError, match=rf'--dest {dest} is a file, not a folder'):
        claim_folder(str(dest), lambda name: True, True, 'an export', '--dest')


DEFAULTS = dict(batch_size=4, learning_rate=1e-3, out_dir='out')


@pytest.mark.parametrize('text, expected', [
    ("from math import pi\nlearning_rate = pi / 1000\n", dict(learning_rate=np.pi / 1000)),   # the case
    ("from math import tau as TAU, e\nimport os.path\nbatch_size = int(TAU)\n", dict(batch_size=6)),
    ("from math import pi\npi = 2 * pi\n", None),    # assigned too: a setting, so an unknown key
])
def test_names_a_config_file_imports_are_not_settings(tmp_path, text, expected):
    path = tmp_path / 'cfg.py'
    path.write_text(text)
    if expected is None:
        with pytest.raises(Exception, match="'pi'"):
            configure(DEFAULTS, [str(path)])
        return
    config = configure(DEFAULTS, [str(path)])
    assert {k: config[k] for k in expected} == pytest.approx(expected)


def test_an_imported_name_that_is_a_setting_is_kept(tmp_path):
    (tmp_path / 'base_cfg.py').write_text("batch_size = 32\n")
    (tmp_path / 'cfg.py').write_text("import sys\nsys.path.insert(0, %r)\nfrom base_cfg import batch_size\n"
                                     % str(tmp_path))
    assert configure(DEFAULTS, [str(tmp_path / 'cfg.py')])['batch_size'] == 32


# --- the commands the campaign never ran: judge.py's and synth.py's request settings (mirim/llm.check_settings)

@pytest.mark.parametrize('change, message', [
    (dict(concurrency=0), r'--concurrency=0: must be a whole number >= 1'),    # ThreadPoolExecutor's traceback
    (dict(retries=-1), r'--retries=-1: must be a whole number >= 0'),          # silently asked nothing
    (dict(timeout=0), r'--timeout=0: must be a positive number'),              # "cannot reach" a server that is up
    (dict(temperature=float('nan')), r'--temperature=nan'),
    (dict(max_tokens=0), r'--max_tokens=0'),
])
def test_request_settings_out_of_range_name_the_setting(change, message):
    from mirim.llm import check_settings
    settings = {**dict(concurrency=8, timeout=120.0, retries=3, backoff=1.0, temperature=0.0, max_tokens=200),
                **change}
    with pytest.raises(ValueError, match=message):
        check_settings(**settings)


@pytest.mark.parametrize('argv, message', [
    (['--concurrency=0'], r'--concurrency=0'),
    (['--criteria= ,'], r'--criteria is empty'),
])
def test_judge_settings_are_checked_before_a_request(tmp_path, argv, message):
    import judge
    samples = tmp_path / 'samples.jsonl'
    samples.write_text(json.dumps({'prompt': 'p', 'text': 'uma historia'}) + '\n')
    with pytest.raises(ValueError, match=message):  # not Fatal: no request was sent to the (down) endpoint
        judge.main([f'--samples={samples}', '--base_url=http://127.0.0.1:9/v1', '--model=j'] + argv)


def story(noun):
    return json.dumps({'text': 'Era uma vez.', 'words': {'noun': noun}, 'model': 'm'}) + '\n'


@pytest.mark.parametrize('text, message', [
    (story('gato') + '{"text": "Era uma\n' + story('rei'), r'is not an earlier output .*\(.*out\.jsonl:2: not valid JSON\)'),
    (story('gato') + '[1, 2]\n' + story('rei'), r'out\.jsonl:2: not a record of this mode'),
    (story('gato') + json.dumps({'id': 0, 'completion': 'x', 'messages': []}) + '\n', r'out\.jsonl:2: not a record'),
    (b'PK\x03\x04\xff\xfe binary\n', r'out\.jsonl: not UTF-8 text'),
])
def test_synth_out_that_is_not_its_output_names_the_line(tmp_path, text, message):
    out = tmp_path / 'out.jsonl'
    out.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = out.read_bytes()
    lang = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'synth', 'pt')
    with pytest.raises(SystemExit, match=message):
        synth_main(['--lang', lang, '--n', '2', '--out', str(out)])
    assert out.read_bytes() == before  # refused: its bytes as they were


@pytest.mark.parametrize('argv, message', [
    (['--n', '0'], r'--n=0: must be >= 1'),
    (['--concurrency', '0'], r'--concurrency=0'),
])
def test_synth_settings_are_checked_before_a_request(tmp_path, argv, message):
    lang = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'synth', 'pt')
    with pytest.raises(SystemExit, match=message):
        synth_main(['--lang', lang, '--out', str(tmp_path / 'out.jsonl')] + argv)


def test_synth_an_empty_prompts_file_is_an_error(tmp_path):
    (tmp_path / 'prompts.jsonl').write_text('\n\n')
    with pytest.raises(SystemExit, match=r'prompts\.jsonl holds no prompts'):
        synth_main(['--prompts', str(tmp_path / 'prompts.jsonl'), '--out', str(tmp_path / 'out.jsonl')])


# --- dpo.py: a start or a run of another command (dpo.check_start_template, dpo.reference)

def dpo_module():
    import dpo
    return dpo


@pytest.mark.parametrize('start', [{'command': 'classify.py'}, {'head': {'weight': torch.zeros(2, 4)}}])
def test_dpo_from_a_classifier_is_refused(tmp_path, start):
    from types import SimpleNamespace
    path = tmp_path / 'cls.pt'
    torch.save({'model': {}, 'model_config': {}, 'tokenizer': {'kind': 'bytes'}, **start}, path)
    c = SimpleNamespace(init_from=str(path), data_dir='data/pref')
    for meta in ({'chat_template': 'chatml'}, {}):  # with or without a template in the data
        with pytest.raises(SystemExit, match=r'cls\.pt is a classifier \(classify\.py\)'):
            dpo_module().check_start_template(c, meta)


@pytest.mark.parametrize('made_by', ['train.py', 'classify.py'])
def test_dpo_resume_of_another_commands_run_names_it(tmp_path, made_by):
    from types import SimpleNamespace
    run = SimpleNamespace(checkpoint={'command': made_by}, meta={'splits': {}})
    c = SimpleNamespace(out_dir=str(tmp_path))
    with pytest.raises(SystemExit, match=rf'ckpt\.pt was written by {made_by}, not dpo\.py'):
        dpo_module().reference(run, c)


# --- class 5: a checkpoint of a later format, and NaN weights of a tied model (mirim/checkpoint.py)

@pytest.mark.parametrize('version', [2, '1', None])
def test_a_checkpoint_of_a_later_or_unknown_format_is_refused(tmp_path, version):
    from mirim.checkpoint import CheckpointError, load_checkpoint
    path = tmp_path / 'ckpt.pt'
    torch.save({'model': {}, 'model_config': {}, 'tokenizer': {}, 'format_version': version}, path)
    with pytest.raises(CheckpointError, match=rf"format_version {version!r}, but this mirim reads format 1"):
        load_checkpoint(str(path))
    torch.save({'model': {}, 'model_config': {}, 'tokenizer': {}, 'format_version': 1}, path)
    assert load_checkpoint(str(path))['format_version'] == 1


def test_nan_weights_of_a_tied_model_say_nan_not_untied(tmp_path):
    from dataclasses import asdict
    from mirim.checkpoint import CheckpointError, load_model
    from model import Llama, LlamaConfig
    model = Llama(LlamaConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                              ffn_hidden=32, tie_embeddings=True))
    state = {k: torch.full_like(v, float('nan')) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    state['output.weight'] = state['tok_embeddings.weight']
    torch.save({'model': state, 'model_config': asdict(model.config), 'tokenizer': {'kind': 'bytes'}},
               tmp_path / 'ckpt.pt')
    with pytest.raises(CheckpointError, match='non-finite weights'):
        load_model(str(tmp_path))


# --- faults at writes: a temp file a killed writer left is removed by the next write of the same file
# (mirim/atomic.remove_stale_temps, through atomic_file and link_atomic: every command's writes)

def dead_pid():
    import subprocess
    p = subprocess.Popen([sys.executable, '-c', 'pass'])
    p.wait()
    return p.pid  # ended and reaped: no process has it (until the system reuses it)


@pytest.mark.parametrize('writer', ['write_atomic', 'link_atomic'])
def test_the_next_write_removes_a_killed_writers_temp_file(tmp_path, writer):
    from mirim import atomic
    target = tmp_path / 'ckpt.pt'
    stale, alive = tmp_path / f'ckpt.pt.tmp{dead_pid()}', tmp_path / f'ckpt.pt.tmp{os.getppid()}'
    other = tmp_path / f'best.pt.tmp{dead_pid()}'
    for path in (stale, alive, other):
        path.write_bytes(b'x' * 1000)  # what kill -9 between the write and the rename leaves
    if writer == 'write_atomic':
        atomic.write_atomic(str(target), b'new')
    else:
        (tmp_path / 'src').write_bytes(b'new')
        atomic.link_atomic(str(tmp_path / 'src'), str(target))
    assert target.read_bytes() == b'new'
    assert not stale.exists()                    # a dead writer's: removed
    assert alive.exists() and other.exists()     # a running process's, and another file's: left alone


# --- odd text: UTF-16, NUL bytes past the first 8 KB, a damaged Parquet file (mirim/corpus.py)

TEXT = 'o gato come o peixe.\n' * 50


@pytest.mark.parametrize('encoding, kind', [
    ('utf-16', r'UTF-16 LE text \(with a byte-order mark\)'),    # the issue's: with a BOM
    ('utf-16-le', r'UTF-16 LE text'),                            # without one
    ('utf-16-be', r'UTF-16 BE text'),
])
def test_utf16_text_is_named_as_such(tmp_path, encoding, kind):
    from mirim.corpus import check_inputs
    for name, data in (('corpus.txt', TEXT), ('pairs.jsonl', json.dumps({'prompt': 'oi', 'chosen': 'a'}) + '\n')):
        path = tmp_path / name
        path.write_bytes(data.encode(encoding))
        with pytest.raises(PrepareError, match=rf'{name}.*looks like {kind}: convert it to UTF-8'):
            check_inputs([str(path)])


@pytest.mark.parametrize('encoding', ['utf-16', 'utf-16-le'])
def test_utf16_jsonl_read_strictly_names_the_file_and_utf16(tmp_path, encoding):
    """classify.py, prepare_pref.py, eval tasks read JSONL through jsonl_records, without check_inputs first"""
    from mirim.corpus import jsonl_records
    path = tmp_path / 'train.jsonl'
    path.write_bytes((json.dumps({'text': 'oi', 'label': 'a'}) + '\n').encode(encoding) * 3)
    with pytest.raises(PrepareError, match=r'train\.jsonl:1: .*looks like UTF-16 LE text'):
        list(jsonl_records(str(path)))


@pytest.mark.parametrize('name, nul_line', [('corpus.txt', 1001), ('corpus.jsonl', 2001)])
def test_nul_bytes_after_the_first_8kb_stop_at_their_line(tmp_path, name, nul_line):
    from mirim.corpus import check_inputs, read_documents
    path = tmp_path / name
    if name.endswith('.jsonl'):
        path.write_bytes((json.dumps({'text': 'o gato'}) + '\n').encode() * 2000 + b'{"text": "a\x00b"}\n')
    else:
        path.write_bytes(TEXT.encode() * 20 + b'a\x00b\n')
    check_inputs([str(path)])  # the first 8 KB are clean
    with pytest.raises(PrepareError, match=rf'{name}:{nul_line}: holds NUL bytes'):
        list(read_documents([str(path)], 'line', 'text', {}))


@pytest.mark.parametrize('damage', ['overwritten page', 'cut short'])
def test_a_damaged_parquet_file_names_the_file_and_row(tmp_path, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mirim.corpus import columnar_records, read_columnar_file
    path = str(tmp_path / 'corpus.parquet')
    pq.write_table(pa.table({'text': [f'documento {i} ' * 20 for i in range(5000)]}), path, row_group_size=1000,
                   compression='none')
    data = bytearray(open(path, 'rb').read())
    if damage == 'overwritten page':
        data[len(data) // 2:len(data) // 2 + 2000] = b'\x55' * 2000
    else:  # the footer kept (a copy that lost a stretch in the middle)
        data = data[:len(data) // 2] + data[-4000:]
    open(path, 'wb').write(bytes(data))
    for read in (lambda: list(read_columnar_file(path, 'text', {})), lambda: list(columnar_records(path))):
        with pytest.raises(PrepareError, match=r'corpus\.parquet: cannot be read as a Parquet file after row \d+'):
            read()


# -----------------------------------------------------------------------------
# a small text file that must be clean UTF-8 (sample.py's prompts file) says what it is instead

@pytest.mark.parametrize('data, says', [
    ('o gato\nos reis\n'.encode('utf-16'), 'UTF-16'),             # with a byte-order mark
    ('o gato\nos reis\n'.encode('utf-16-be'), 'UTF-16'),          # without one
    (b'o gato\nos r\xe9is\n', ':2: not UTF-8'),                   # Latin-1 on line 2
    (b'o gato\n' * 2000 + b'a\x00b\n', ':2001: holds NUL'),       # past the first 8 KB
])
def test_a_prompts_file_that_is_not_utf8_text_is_one_line_naming_it(tmp_path, data, says):
    from mirim.corpus import text_lines
    path = tmp_path / 'prompts.txt'
    path.write_bytes(data)
    with pytest.raises(PrepareError, match=says) as e:
        text_lines(str(path))
    assert str(path) in str(e.value)
    path.write_bytes('\ufeffo gato\r\nos reis\n'.encode('utf-8'))  # a BOM and CRLF are fine
    assert text_lines(str(path)) == ['o gato', 'os reis']


@pytest.mark.parametrize('error', [OSError('11008 requested and 7888 written'), OSError(28, 'No space left on device')])
def test_a_gguf_write_that_stops_short_names_the_file_and_leaves_nothing(tmp_path, monkeypatch, error):
    gguf = pytest.importorskip('gguf')
    from mirim.gguf_export import write_gguf
    from mirim.tokenizer import load_tokenizer
    from model import Llama, LlamaConfig
    tok = load_tokenizer('bytes')
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, block_size=32,
                              ffn_hidden=64), seed=0)

    def full(self, *args, **kwargs):
        raise error
    monkeypatch.setattr(gguf.GGUFWriter, 'write_tensors_to_file', full)
    path = str(tmp_path / 'm.gguf')
    with pytest.raises(OSError, match='cannot write .*m.gguf: .*(no space|No space)'):
        write_gguf(model, tok, path, log=lambda *a: None)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('under', ['plain.txt/out.json', 'plain.txt/deeper/out.json'])
def test_an_output_file_that_cannot_be_written_is_refused_before_the_work(tmp_path, under):
    from mirim.atomic import claim_file
    (tmp_path / 'plain.txt').write_text('a file\n')
    with pytest.raises(ValueError, match=r'cannot write .*plain.txt is not a directory; choose another --json'):
        claim_file(str(tmp_path / under), False, '--json')
    claim_file(str(tmp_path / 'new' / 'out.json'), False, '--json')  # a folder to make is fine, and nothing is left
    assert os.listdir(tmp_path / 'new') == []


@pytest.mark.parametrize('argv, says', [(['--template=llama3'], 'llama3'), (['--json={file}/s.json'], 'plain.txt')])
def test_exact_match_refuses_its_settings_before_asking_any_model(tmp_path, argv, says):
    import subprocess
    (tmp_path / 'plain.txt').write_text('a file\n')
    questions = tmp_path / 'q.jsonl'
    questions.write_text(json.dumps({'prompt': 'p', 'chosen': 'c', 'task': 't'}) + '\n')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(root, 'data', 'biblia', 'exact_match.py'),
                        f'--model={tmp_path}/no-model', f'--questions={questions}',
                        *[a.format(file=tmp_path / 'plain.txt') for a in argv]], capture_output=True, text=True)
    assert p.returncode != 0 and 'Traceback' not in p.stderr and says in p.stderr.strip().splitlines()[-1]
