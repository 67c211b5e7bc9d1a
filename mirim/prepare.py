"""
Documents -> tokenized .bin shards + meta.json, ready for train.py. prepare(documents, tokenizer,
out_dir, ...) is the core: data/prepare.py is its command, mirim/biblia.py calls it too. The
fine-tuning preparations (mirim/chat_data.py, mirim/pref_data.py) share the rest with it: the
train / val split, the split writers, the tokenizer's file and fields in meta.json, the output
folder's rules (write_output), the settings checks, progress and warnings.
"""

import contextlib
import hashlib
import itertools
import multiprocessing
import os
import random
import re
import signal
import sys
import time
from collections import deque

import numpy as np
from tqdm import tqdm

from mirim.atomic import claim_folder, write_atomic
from mirim.corpus import describe_problems, no_documents_error, PrepareError
from mirim.shards import mask_path, ShardWriter, token_dtype, write_meta
from mirim.tokenizer import (load_tokenizer, SENTENCEPIECE_VOCAB_FILE, TOKENIZER_FILES, train_bytelevel_bpe,
                             train_sentencepiece)

SHARD_FILE = re.compile(r'(train|val)_\d{6}(\.mask)?\.bin(\.tmp)?$')
# the tokenizer's own file, copied into the data folder: which field of to_dict() holds it
TOKENIZER_FILE_OF = dict(TOKENIZER_FILES.values())
# every tokenizer file a data folder may hold: those, and the .vocab beside a SentencePiece model
TOKENIZER_FILE_NAMES = (*TOKENIZER_FILE_OF.values(), SENTENCEPIECE_VOCAB_FILE)
# every file a preparation writes into its folder (write_atomic's temp names end in .tmp<pid>); nothing else is touched
OUTPUT_FILE = re.compile(SHARD_FILE.pattern + '|(' + '|'.join(map(re.escape, ('meta.json', *TOKENIZER_FILE_NAMES)))
                         + r')(\.tmp\d+)?$')
PROGRESS_EVERY = 60  # seconds between plain progress lines when stderr is not a terminal


# -----------------------------------------------------------------------------
# train / val split

def is_val_document(index, val_fraction, seed=1337):
    """One document in each group of round(1/val_fraction) goes to val (document 0 in the first group)."""
    if val_fraction <= 0:
        return False
    group_size = max(2, round(1 / val_fraction))
    group, position = divmod(index, group_size)
    if group == 0:
        return position == 0
    digest = hashlib.blake2b(f"{seed}:{group}".encode(), digest_size=8).digest()
    return position == int.from_bytes(digest, 'little') % group_size


def labelled_splits(items, val_items, val_fraction, seed):
    """('train' | 'val', item) for each item: val_items (when given) are the val split, else every
    item's split comes from is_val_document (fine-tuning sets: conversations, preference pairs)."""
    if val_items is None:
        for n, item in enumerate(items):
            yield ('val' if is_val_document(n, val_fraction, seed) else 'train'), item
    else:
        yield from (('train', item) for item in items)
        yield from (('val', item) for item in val_items)


# -----------------------------------------------------------------------------
# tokenizing in worker processes

_worker_tokenizer = None


def _init_worker(description):
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool; no traceback per worker
    _worker_tokenizer = load_tokenizer(description)  # each worker builds its own from the plain description


def tokenize_chunk(chunk, tokenizer=None, dtype=np.uint32):
    """[(split, text), ...] -> {split: (tokens as one array, documents, UTF-8 bytes)}, documents in order."""
    texts = [text for _, text in chunk]
    if tokenizer is None:  # in a worker: one thread per process, so num_proc processes use num_proc cores
        ids = [_worker_tokenizer.encode(text, bos=True, eos=True) for text in texts]
    else:  # one process: encode_batch spreads SentencePiece / tiktoken over threads itself
        ids = tokenizer.encode_batch(texts, bos=True, eos=True)
    out = {}
    for split in ('train', 'val'):
        picked = [i for i, (s, _) in enumerate(chunk) if s == split]
        if picked:
            count = sum(len(ids[i]) for i in picked)
            tokens = np.fromiter(itertools.chain.from_iterable(ids[i] for i in picked), dtype=dtype, count=count)
            text_bytes = sum(len(chunk[i][1].encode('utf-8')) for i in picked)
            out[split] = (tokens, len(picked), text_bytes)
    return out


def chunked(labelled, chunk_chars):
    """Group (split, text) pairs into lists of about chunk_chars characters: one task for a worker."""
    chunk, size = [], 0
    for item in labelled:
        chunk.append(item)
        size += len(item[1])
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def ordered_map(pool, function, arguments, ahead):
    """pool.imap, but reading at most `ahead` tasks ahead (imap reads its whole input at once)."""
    pending = deque()
    for args in arguments:
        pending.append(pool.apply_async(function, args))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# -----------------------------------------------------------------------------
# shared with mirim/chat_data.py and mirim/pref_data.py: settings, the output folder, progress, warnings

def check_settings(val_fraction, shard_tokens, num_proc=1):
    """PrepareError for a setting out of range, raised before anything is written."""
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0 < shard_tokens < 2**31:
        raise PrepareError(f"shard_tokens must be in [1, 2**31), got {shard_tokens}")
    if num_proc < 1:
        raise PrepareError(f"num_proc must be at least 1, got {num_proc}")


class PlainProgress:
    """Progress for a log file or a pipe, where tqdm's redrawn bar would add a line per update: a plain
    line on stderr every PROGRESS_EVERY seconds, its rate taken over all the time so far."""

    def __init__(self, desc):
        self.desc, self.start = desc, time.time()
        self.last = self.start

    def update(self, done, amount, unit):
        now = time.time()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            print(f"{self.desc}: {done}, {amount / (now - self.start):,.0f} {unit}/s", file=sys.stderr, flush=True)


def val_share_warning(counts, val_fraction, unit, hint):
    """A warning when val holds more than twice val_fraction of the tokens. The first document always
    goes to val, so that even a tiny corpus has a val split; with a few big documents that is a lot."""
    tokens = counts['train']['tokens'] + counts['val']['tokens']
    share = counts['val']['tokens'] / max(tokens, 1)
    if not val_fraction or share <= 2 * val_fraction:
        return None
    documents = counts['train']['documents'] + counts['val']['documents']
    return (f"val holds {share:.1%} of the tokens ({counts['val']['documents']:,} of {documents:,} {unit}s), "
            f"far more than --val_fraction {val_fraction}: at least one {unit} always goes to val; {hint}")


def files_holding(out_dir, tokenizer):
    """The tokenizer files in out_dir that already hold this tokenizer, e.g. after `tokenizer.py --out
    data/x/tokenizer.model`: preparing data/x with it keeps them (and the .vocab beside the model)."""
    if tokenizer is None:  # a tokenizer yet to be trained replaces them all
        return set()
    description = tokenizer.to_dict()
    keep = set()
    for field, name in TOKENIZER_FILE_OF.items():
        data, path = description.get(field), os.path.join(out_dir, name)
        if isinstance(data, bytes) and os.path.isfile(path) and read_bytes(path) == data:
            keep |= {name, SENTENCEPIECE_VOCAB_FILE} if field == 'model_proto' else {name}
    return keep


def remove_output(out_dir, names):
    """Remove these files of out_dir, meta.json first: from then on the folder is no data set, never an old
    meta.json with new files beside it."""
    for name in sorted(names, key=lambda name: name != 'meta.json'):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))


def error_line(e, out_dir):
    """One line for an error; an OSError names its file (a failed write() names none: then the folder)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename or out_dir}: {e.strerror}"
    return str(e)


def write_output(out_dir, overwrite, tokenizer, write, also=()):
    """
    Run write(), which prepares out_dir, the way the command lines do. A folder that already holds a data
    set or part of one is refused unless overwrite (mirim/atomic.claim_folder, the rule of every command
    that writes); then its files go first (meta.json before anything else; tokenizer files that already
    hold `tokenizer` stay; files that are not ours are never touched). also: names of other files that
    write() puts beside the data set (data/biblia/make_tasks.py's train.jsonl, val.jsonl), claimed and
    removed with it.
    An error or Ctrl-C removes what was written, so the folder never holds a data set that looks complete
    and is not, and exits with one line (130 after Ctrl-C).
    """
    ours = lambda name: bool(OUTPUT_FILE.match(name)) or name in also  # noqa: E731
    try:
        keep = files_holding(out_dir, tokenizer)
        old = claim_folder(out_dir, ours, overwrite, 'a prepared data set', '--out', keep)
    except OSError as e:  # an unreadable folder
        sys.exit(f"error: {error_line(e, out_dir)}")
    except ValueError as e:  # the rule of every command that writes (mirim/atomic.py)
        sys.exit(f"error: {e}")
    created = not os.path.isdir(out_dir)
    try:
        remove_output(out_dir, old)
        write()
    except BaseException as e:
        with contextlib.suppress(OSError):  # best effort: the error that stopped the run is the one to report
            remove_output(out_dir, [name for name in os.listdir(out_dir) if ours(name) and name not in keep])
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only if empty
        if isinstance(e, KeyboardInterrupt):
            print(f"interrupted: the partial output in {out_dir} was removed", file=sys.stderr)
            sys.exit(130)
        if isinstance(e, OSError):
            sys.exit(f"error: {error_line(e, out_dir)} (the partial output in {out_dir} was removed)")
        if isinstance(e, PrepareError):
            sys.exit(f"error: {e}")
        raise


def open_tokenizer(spec):
    """load_tokenizer for a command line: a bad file or an offline tiktoken is a PrepareError, one line."""
    try:
        return load_tokenizer(spec)
    except (ValueError, RuntimeError) as e:
        raise PrepareError(f"--tokenizer {spec}: {e}") from None


# -----------------------------------------------------------------------------
# the core: documents -> shards + meta.json

def tokenizer_fields(tokenizer, out_dir):
    """The tokenizer's part of meta.json: what train.py, eval.py and sample.py read back."""
    return {'tokenizer': tokenizer_meta(tokenizer, out_dir), 'vocab_size': tokenizer.vocab_size,
            'bos_id': tokenizer.bos_id, 'eos_id': tokenizer.eos_id, 'pad_id': tokenizer.pad_id,
            'special_tokens': tokenizer.special_tokens, 'chat_template': tokenizer.chat_template}


def tokenizer_meta(tokenizer, out_dir):
    """The meta.json form of the tokenizer: to_dict() without bytes; its file is copied into out_dir.
    Tokenizer files of an earlier data set that do not describe this one are removed (a tokenizer.model
    beside shards of the bytes tokenizer, a tokenizer.vocab of another model)."""
    description = tokenizer.to_dict()
    keep = set()
    for field, name in TOKENIZER_FILE_OF.items():
        if isinstance(description.get(field), bytes):
            path = os.path.join(out_dir, name)
            if os.path.exists(path) and read_bytes(path) == description[field]:
                if field == 'model_proto':
                    keep.add(SENTENCEPIECE_VOCAB_FILE)  # written beside this very model (tokenizer.py, train:VOCAB)
            else:
                write_atomic(path, description[field])
            keep.add(name)
            description['path'] = name  # relative to the data folder
    for name in TOKENIZER_FILE_NAMES:
        if name not in keep and os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    return {k: v for k, v in description.items() if not isinstance(v, bytes)}


def read_bytes(path):
    with open(path, 'rb') as f:
        return f.read()


def remove_stale_shards(out_dir, keep):
    for name in os.listdir(out_dir):
        if SHARD_FILE.match(name) and name not in keep:
            os.remove(os.path.join(out_dir, name))


def open_split_writers(out_dir, vocab_size, shard_tokens, with_mask=False):
    """The train and val ShardWriters of a data set being (re)written into out_dir. An old meta.json
    is removed first: the directory is not a valid data set again until the new one is written. Then
    the old shards: they free their space for the new ones, and a failed run leaves none behind."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, 'meta.json')):
        os.remove(os.path.join(out_dir, 'meta.json'))
    remove_stale_shards(out_dir, keep=())
    return {split: ShardWriter(out_dir, split, vocab_size, shard_tokens, with_mask=with_mask)
            for split in ('train', 'val')}


def abort_split_writers(writers, out_dir):
    """After an error or Ctrl-C: drop every shard of the run, finished or not (no orphans fill the disk)."""
    for writer in writers.values():
        writer.abort()
    remove_stale_shards(out_dir, keep=())


def close_split_writers(writers, out_dir, counts, all_val_error):
    """Finish both splits -> {split: shard names}; shards of an earlier data set are removed. If no
    document reached train, every shard goes and PrepareError(all_val_error) is raised."""
    names = {split: writer.close() for split, writer in writers.items()}
    if counts['train']['documents'] == 0:
        remove_stale_shards(out_dir, keep=())
        raise PrepareError(all_val_error)
    keep = {shard for shards in names.values() for shard in shards}
    if writers['train'].with_mask:
        keep |= {mask_path(shard) for shard in keep}
    remove_stale_shards(out_dir, keep)
    return names


def prepare(documents, tokenizer, out_dir, val_fraction=0.005, shard_tokens=100_000_000, num_proc=1,
            seed=1337, val_documents=None, problems=None, source='the input', extra_meta=None,
            progress_total=None, chunk_chars=1 << 19):
    """
    Tokenize documents (any iterable of strings, read lazily) into out_dir: train_*.bin, val_*.bin,
    the tokenizer file, and meta.json (written last). Returns the meta dict.

    tokenizer: a Tokenizer or a spec for load_tokenizer. Split: by val_fraction (see is_val_document),
    or, when val_documents is given, `documents` all go to train and `val_documents` all to val
    (data/biblia holds out whole books this way). The output does not depend on num_proc.
    problems: the dict the readers count input problems in; they become warnings at the end.
    Raises PrepareError, before writing anything, if there is no non-empty document or a setting is out
    of range. On any error or Ctrl-C while writing, every shard of the run is removed, and no meta.json.
    """
    t0 = time.time()
    tokenizer = load_tokenizer(tokenizer)
    check_settings(val_fraction, shard_tokens, num_proc)
    documents = (text for text in documents if text.strip())  # readers count the empty ones
    if val_documents is None:
        labelled = (('val' if is_val_document(i, val_fraction, seed) else 'train', text)
                    for i, text in enumerate(documents))
    else:
        val_documents = (text for text in val_documents if text.strip())
        labelled = itertools.chain((('train', text) for text in documents), (('val', text) for text in val_documents))
    chunks = chunked(labelled, chunk_chars)
    first = next(chunks, None)  # peek: no documents -> nothing touched on disk
    if first is None:
        raise no_documents_error(source, problems)

    dtype = token_dtype(tokenizer.vocab_size)
    writers = open_split_writers(out_dir, tokenizer.vocab_size, shard_tokens)
    counts = {split: {'tokens': 0, 'bytes': 0, 'documents': 0} for split in writers}
    pool = None
    if num_proc > 1:  # started before the progress bar's thread exists: forking a threaded process is fragile
        pool = multiprocessing.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer.to_dict(),))
    # a bar on a terminal; in a log, where each redraw would be a line, a plain line now and then
    terminal = sys.stderr.isatty()
    bar = tqdm(total=progress_total, unit='B', unit_scale=True, desc=f"tokenizing -> {out_dir}", disable=not terminal)
    plain = PlainProgress(f"tokenizing -> {out_dir}")
    try:
        tasks = itertools.chain([first], chunks)
        if pool is not None:
            results = ordered_map(pool, tokenize_chunk, ((chunk, None, dtype) for chunk in tasks), ahead=4 * num_proc)
        else:
            results = (tokenize_chunk(chunk, tokenizer, dtype) for chunk in tasks)
        for result in results:
            for split, (tokens, documents_in_chunk, text_bytes) in result.items():
                writers[split].write(tokens)
                counts[split]['tokens'] += len(tokens)
                counts[split]['documents'] += documents_in_chunk
                counts[split]['bytes'] += text_bytes
                bar.update(text_bytes)
            total_tokens = counts['train']['tokens'] + counts['val']['tokens']
            bar.set_postfix(tokens=f"{total_tokens:,}", refresh=False)
            if not terminal:
                text_mb = (counts['train']['bytes'] + counts['val']['bytes']) / 1e6
                plain.update(f"{text_mb:,.1f} MB of text, {total_tokens:,} tokens", total_tokens, 'tokens')
        if progress_total:
            bar.update(max(0, progress_total - bar.n))  # the bar counts text bytes, the total file bytes
        names = close_split_writers(writers, out_dir, counts,
                                    f"all {counts['val']['documents']} document(s) of {source} went to val, none to "
                                    f"train: give more documents (e.g. --doc_per line) or a smaller --val_fraction")
        seconds = time.time() - t0

        val_warning = None if val_documents is not None else val_share_warning(
            counts, val_fraction, 'document', "give more, smaller documents (e.g. --doc_per block or line)")
        warnings_found = describe_problems(problems or {}) + ([val_warning] if val_warning else [])
        meta = {
            **tokenizer_fields(tokenizer, out_dir),
            'splits': {split: {**counts[split], 'shards': names[split]} for split in writers},
            'source': source,
            'val_fraction': val_fraction if val_documents is None else None,
            'seed': seed,
            'shard_tokens': shard_tokens,
            'warnings': warnings_found,
            **(extra_meta or {}),
        }
        write_meta(out_dir, meta)
    except BaseException:
        abort_split_writers(writers, out_dir)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    total_bytes = counts['train']['bytes'] + counts['val']['bytes']
    total_tokens = counts['train']['tokens'] + counts['val']['tokens']
    for split, c in counts.items():
        print(f"{split}: {c['documents']:,} documents, {c['tokens']:,} tokens, {c['bytes']:,} bytes "
              f"({c['bytes'] / max(c['tokens'], 1):.2f} bytes/token), {len(names[split])} shard(s)")
    print(f"wrote {out_dir} in {seconds:.1f}s: {total_bytes / 1e6 / max(seconds, 1e-9):.2f} MB/s of text, "
          f"{total_tokens / max(seconds, 1e-9):,.0f} tokens/s with {num_proc} process(es)")
    for line in warnings_found:
        print(f"warning: {line}", file=sys.stderr)
    return meta


# -----------------------------------------------------------------------------
# training a tokenizer on the input first (--tokenizer train:VOCAB)

def sample_documents(documents, max_bytes, total_bytes=None, seed=1337):
    """At most about max_bytes of documents, spread over the whole input when its size is known."""
    keep = 1.0 if not total_bytes else min(1.0, max_bytes / total_bytes)
    rng = random.Random(seed)
    taken = 0
    for text in documents:
        if rng.random() < keep:
            taken += len(text.encode('utf-8'))
            yield text
            if taken >= max_bytes:
                return


def train_tokenizer_on_input(read, vocab_size, out_dir, sample_bytes, total_bytes, seed, source, bytelevel=False):
    """read() -> a fresh document iterator. Trains SentencePiece (out_dir/tokenizer.model) or, with bytelevel,
    a byte-level BPE (out_dir/tokenizer.json) on a sample."""
    problems = {}
    sample = sample_documents(read(problems), sample_bytes, total_bytes, seed)
    first = next(sample, None)
    if first is None:
        raise no_documents_error(source, problems)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, TOKENIZER_FILES['tokenizers' if bytelevel else 'sentencepiece'][1])
    what = 'byte-level BPE' if bytelevel else 'SentencePiece'
    print(f"training a {vocab_size:,}-piece {what} tokenizer on at most {sample_bytes / 1e6:.0f} MB of the input")
    t0 = time.time()
    try:
        train = train_bytelevel_bpe if bytelevel else train_sentencepiece
        tokenizer = train(itertools.chain([first], sample), path, vocab_size=vocab_size)
    except ValueError as e:  # e.g. a vocab too large for a small corpus
        raise PrepareError(f"{e}; choose another VOCAB") from None
    print(f"wrote {path} in {time.time() - t0:.1f}s")
    return tokenizer
