"""
Any corpus -> tokenized .bin shards + meta.json, ready for train.py.

    python data/prepare.py --input corpus/ --tokenizer train:8192 --out data/mycorpus
    python data/prepare.py --input 'dumps/*.jsonl.gz' --text_field text --tokenizer data/x/tokenizer.model --out data/y
    python data/prepare.py --hf_dataset NAME --hf_split train --tokenizer tiktoken:gpt2 --out data/z
    python data/prepare.py --hf_dataset parquet --data_files 'corpus/*.parquet' --tokenizer bytes --out data/w

Inputs: files, folders (searched recursively for .txt .md .jsonl .json, also gzipped, .parquet and
.arrow), datasets.save_to_disk folders (a DatasetDict's --hf_split), or globs.
Documents, each written as <bos> text <eos>:
  - JSONL (.jsonl, .json, .jsonl.gz): one document per record, its --text_field string.
  - Parquet, Arrow (.parquet, .arrow): one document per row, its --text_field column; read with
    pyarrow a row group / record batch at a time, so a corpus larger than memory works.
  - text: --doc_per block (default): blank-line-separated blocks (paragraphs, articles);
    --doc_per line: every non-blank line; --doc_per file: a whole file.
    Line ends are normalized to \\n; a UTF-8 byte-order mark is dropped.
--tokenizer: 'bytes', 'tiktoken:NAME', a SentencePiece .model file, a Hugging Face tokenizer.json
or model folder, or train:VOCAB to train a SentencePiece BPE of VOCAB pieces (train-bytelevel:VOCAB:
a byte-level BPE, tokenizer.json) on (a sample of at most --sample_bytes of) the input first.
The tokenizer file is copied into --out, so the folder is self-contained.

Validation split, by document and deterministic: documents are taken in groups of
k = round(1 / val_fraction) in input order, and one document of each group, picked by a hash
of (--seed, group), goes to val; in the first group it is document 0, so even a tiny corpus has a
val split. That is val_fraction of the documents, spread over the whole corpus, without the
aliasing that "every k-th document" has on inputs with a periodic structure.

A corpus of few documents (--doc_per file on two files) would lose much of its text to that first
val document: when val holds more than twice val_fraction of the tokens, that is a warning.

Bad input: no documents at all is an error and writes nothing; so is a Parquet/Arrow file without
the --text_field column, or a binary file given as text (the message says what it looks like). Invalid UTF-8 is decoded with
U+FFFD replacement characters; JSONL lines that are not JSON, or records without a string
--text_field, are skipped. Each of these is counted and reported at the end as one warning naming
the first place it happened (and saved in meta.json under "warnings"); if every record lacks the
field, that is the error.

The output folder: one that already holds a data set (or part of one) is refused unless
--overwrite. Every setting, the inputs and the tokenizer are checked before anything in it is
touched. Then the old data set's files go, meta.json first (other files in the folder are left
alone; a tokenizer file that already holds the --tokenizer stays). Shards are written under .tmp
names and renamed when complete, and meta.json is written last. Any error (a full disk, a
read-only folder) or Ctrl-C removes what the run wrote and ends with one line (exit status 130
after Ctrl-C), so the folder never holds a data set that looks complete and is not. On a terminal
a progress bar shows; in a log (stderr not a terminal) a plain line every PROGRESS_EVERY seconds.

The reusable core is prepare(documents, tokenizer, out_dir, ...); data/biblia/prepare.py calls it.
"""

import argparse
import contextlib
import glob
import gzip
import hashlib
import itertools
import json
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from mirim.atomic import write_atomic
from mirim.shards import mask_path, ShardWriter, token_dtype, write_meta
from mirim.tokenizer import check_vocab_size, load_tokenizer, train_bytelevel_bpe, train_sentencepiece

TEXT_SUFFIXES = ('.txt', '.md', '.txt.gz', '.md.gz')
JSONL_SUFFIXES = ('.jsonl', '.json', '.jsonl.gz', '.json.gz')
COLUMNAR_SUFFIXES = ('.parquet', '.arrow')  # Hugging Face datasets' formats, read with pyarrow
INPUT_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + COLUMNAR_SUFFIXES
SAVED_DATASET_FILES = ('state.json', 'dataset_info.json', 'dataset_dict.json')  # save_to_disk's, not corpora
SHARD_FILE = re.compile(r'(train|val)_\d{6}(\.mask)?\.bin(\.tmp)?$')
TOKENIZER_FILES = ('tokenizer.model', 'tokenizer.vocab', 'tokenizer.tiktoken', 'tokenizer.json')
# the tokenizer's own file, copied into the data folder: which field of to_dict() holds it
TOKENIZER_FILE_OF = {'model_proto': 'tokenizer.model', 'ranks': 'tokenizer.tiktoken', 'tokenizer_json': 'tokenizer.json'}
# every file a preparation writes into its folder (write_atomic's temp names end in .tmp<pid>); nothing else is touched
OUTPUT_FILE = re.compile(r'(train|val)_\d{6}(\.mask)?\.bin(\.tmp)?$'
                         r'|(meta\.json|tokenizer\.(model|vocab|tiktoken|json))(\.tmp\d+)?$')
PROGRESS_EVERY = 60  # seconds between plain progress lines when stderr is not a terminal


class PrepareError(ValueError):
    """Input that cannot be prepared; the message says what is wrong and what to do."""


# -----------------------------------------------------------------------------
# input problems: counted while streaming, reported once at the end

def note(problems, kind, where):
    if problems is not None:
        count, first = problems.get(kind, (0, where))
        problems[kind] = (count + 1, first)


def describe_problems(problems):
    what = {
        'invalid_utf8': "line(s) with invalid UTF-8 were decoded with U+FFFD replacement characters",
        'bad_json': "line(s) are not valid JSON (JSONL needs one JSON object per line) and were skipped",
        'missing_field': "record(s) without the text field were skipped",
        'empty': "empty document(s) were skipped",
    }
    return [f"{count:,} {what[kind]} (first: {first})" for kind, (count, first) in problems.items()]


# -----------------------------------------------------------------------------
# reading documents, lazily

def expand_inputs(patterns, split='train'):
    """Files, folders and globs -> a sorted, de-duplicated list of files to read. A datasets.save_to_disk
    folder gives its .arrow files (a DatasetDict: those of `split`)."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise PrepareError(f"input not found: {pattern}")
        for match in matches:
            if os.path.isdir(match) and is_saved_dataset(match):
                paths.extend(saved_dataset_files(match, split))
            elif os.path.isdir(match):
                found = sorted(os.path.join(root, name) for root, dirs, names in os.walk(match) for name in names
                               if name.endswith(INPUT_SUFFIXES) and not name.startswith('.')
                               and name not in SAVED_DATASET_FILES)
                if not found:
                    raise PrepareError(f"folder {match} holds no input files ({' '.join(INPUT_SUFFIXES)})")
                paths.extend(found)
            else:
                paths.append(match)
    return list(dict.fromkeys(paths))


# -----------------------------------------------------------------------------
# Parquet and Arrow (Hugging Face datasets' own formats), read a batch of rows at a time

def is_saved_dataset(folder):
    return any(os.path.isfile(os.path.join(folder, name)) for name in ('state.json', 'dataset_dict.json'))


def saved_dataset_files(folder, split='train'):
    """The .arrow files of a datasets.save_to_disk folder: a Dataset (state.json lists them) or a
    DatasetDict (dataset_dict.json lists its splits, each a Dataset folder), read without `datasets`."""
    if os.path.isfile(os.path.join(folder, 'dataset_dict.json')):
        with open(os.path.join(folder, 'dataset_dict.json'), encoding='utf-8') as f:
            splits = json.load(f).get('splits') or []
        if split not in splits:
            raise PrepareError(f"{folder} is a saved DatasetDict without a split {split!r}; its splits: "
                               f"{', '.join(splits)} (choose one with --hf_split)")
        return saved_dataset_files(os.path.join(folder, split), split)
    with open(os.path.join(folder, 'state.json'), encoding='utf-8') as f:
        files = [os.path.join(folder, entry['filename']) for entry in json.load(f).get('_data_files') or []]
    missing = [path for path in files if not os.path.isfile(path)]
    if not files or missing:
        raise PrepareError(f"{folder} is a saved dataset whose state.json lists "
                           f"{'missing files: ' + ', '.join(missing) if missing else 'no data files'}")
    return files


def record_batches(path, columns=None):
    """pyarrow RecordBatches of a .parquet file (by row group) or an .arrow file (IPC file or stream
    format; datasets writes streams), never the whole table at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if path.endswith('.parquet'):
        yield from pq.ParquetFile(path).iter_batches(batch_size=1024, columns=columns)
        return
    with pa.memory_map(path) as source:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            batches = pa.ipc.open_stream(source)
        for batch in batches:
            yield batch.select(columns) if columns else batch


def columnar_fields(path):
    """The column names of a .parquet or .arrow file, from its schema alone; PrepareError if it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        if path.endswith('.parquet'):
            return pq.read_schema(path).names
        with pa.memory_map(path) as source:
            try:
                return pa.ipc.open_file(source).schema.names
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_stream(source).schema.names
    except (pa.ArrowInvalid, OSError) as e:
        kind = 'Parquet' if path.endswith('.parquet') else 'Arrow'
        raise PrepareError(f"{path} is not a readable {kind} file ({str(e).strip().splitlines()[0][:150]})") from None


def read_columnar_file(path, text_field='text', problems=None):
    row = 0
    for batch in record_batches(path, [text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            where = f"{path} row {row}"
            if not isinstance(value, str):
                note(problems, 'missing_field', f"{where}: its '{text_field}' is {type(value).__name__}, not text")
                continue
            text = document_from_record({text_field: value}, text_field, where, problems)
            if text is not None:
                yield text


def columnar_records(path):
    """(where, record as a dict) for every row of a .parquet or .arrow file: chat data in these formats."""
    row = 0
    for batch in record_batches(path):
        for record in batch.to_pylist():
            row += 1
            yield f"{path} row {row}", record


# what a binary file given as text looks like, by its first bytes
MAGIC = ((b'PAR1', "a Parquet file: name it .parquet"), (b'ARROW1', "an Arrow file: name it .arrow"),
         (b'\xff\xff\xff\xff', "an Arrow stream (as datasets writes): name it .arrow"),
         (b'\x1f\x8b', "gzip-compressed: name it .gz"), (b'PK\x03\x04', "a zip archive: unpack it first"),
         (b'SQLite format 3\x00', "an SQLite database: export its text first"),
         (b'\x93NUMPY', "a NumPy array, not text"))


def check_inputs(paths, text_field='text'):
    """Before anything is written: every Parquet/Arrow file is one and has the text field (unless None), and no file read as text
    or JSONL is binary. PrepareError, one line, naming the file and what it looks like."""
    for path in paths:
        if path.endswith(COLUMNAR_SUFFIXES):
            fields = columnar_fields(path)
            if text_field is not None and text_field not in fields:
                raise PrepareError(f"{path} has no column '{text_field}'; its columns: {', '.join(fields)} "
                                   f"(name the one holding the text with --text_field)")
            continue
        if not os.path.isfile(path):  # a pipe (--input /dev/stdin, <(zcat ...)): reading it now would eat its text
            continue
        with open_binary(path) as f:
            try:
                head = f.read(8192)
            except (OSError, EOFError) as e:  # e.g. a .gz that is not gzip
                raise PrepareError(f"{path}: cannot be read ({e})") from None
        for magic, what in MAGIC:
            if head.startswith(magic) and not (magic == b'\x1f\x8b' and path.endswith('.gz')):
                raise PrepareError(f"{path} is not text, it looks like {what}")
        if b'\x00' in head:
            raise PrepareError(f"{path} is not text, it holds NUL bytes (a binary file, or UTF-16 text: convert "
                               f"it to UTF-8)")


def open_binary(path):
    return gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')


def decoded_lines(path, problems):
    """(line number, text without its line end) for each line; invalid UTF-8 is replaced and counted."""
    with open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode('utf-8')
            except UnicodeDecodeError:
                line = raw.decode('utf-8', errors='replace')
                note(problems, 'invalid_utf8', f"{path}:{number}")
            if number == 1 and line.startswith('\ufeff'):
                line = line[1:]
            yield number, line.rstrip('\r\n')


def read_text_file(path, doc_per='block', problems=None):
    if doc_per == 'file':
        text = '\n'.join(line for _, line in decoded_lines(path, problems))
        if text.strip():
            yield text
        else:
            note(problems, 'empty', path)
        return
    block = []
    for _, line in decoded_lines(path, problems):
        if doc_per == 'line':
            if line.strip():
                yield line
        elif line.strip():
            block.append(line)
        elif block:  # a blank line ends a block
            yield '\n'.join(block)
            block = []
    if block:
        yield '\n'.join(block)


def document_from_record(record, text_field, where, problems):
    """A record's text, or None (counted) when it has no string text_field."""
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        fields = ', '.join(map(str, record)) if isinstance(record, dict) else f"none, it is a {type(record).__name__}"
        note(problems, 'missing_field', f"{where} has no string field '{text_field}'; its fields: {fields}")
        return None
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:  # lone surrogates from JSON escapes such as "\ud800"
        text = text.encode('utf-8', errors='replace').decode('utf-8')
        note(problems, 'invalid_utf8', where)
    if not text.strip():
        note(problems, 'empty', where)
        return None
    return text


def read_jsonl_file(path, text_field='text', problems=None):
    for number, line in decoded_lines(path, problems):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            note(problems, 'bad_json', f"{path}:{number}")
            continue
        text = document_from_record(record, text_field, f"{path}:{number}", problems)
        if text is not None:
            yield text


def jsonl_records(path, error=None):
    """(where, record) for every non-blank line of a JSONL file (.jsonl, optionally gzipped), strictly:
    a missing file or a line that is not JSON raises `error` (PrepareError by default) naming path:line.
    Fine-tuning data is read this way; pretraining text (read_jsonl_file) counts bad lines instead."""
    import gzip
    error = error or PrepareError
    if not os.path.isfile(path):
        raise error(f"input not found: {path}")
    with (gzip.open(path, 'rt', encoding='utf-8') if path.endswith('.gz') else open(path, encoding='utf-8')) as f:
        number = 0
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                f"JSONL needs one JSON object per line") from None
                yield where, record
        except UnicodeDecodeError:
            raise error(f"{path}:{number + 1}: not UTF-8 text (a binary file, or another encoding): JSONL is "
                        f"UTF-8") from None


def read_documents(paths, doc_per='block', text_field='text', problems=None):
    """Every document of every file, in order, one at a time."""
    for path in paths:
        if path.endswith(COLUMNAR_SUFFIXES):
            yield from read_columnar_file(path, text_field, problems)
        elif path.endswith(JSONL_SUFFIXES):
            yield from read_jsonl_file(path, text_field, problems)
        else:
            yield from read_text_file(path, doc_per, problems)


# --hf_dataset FILE: the datasets builder that reads one local data file
HF_BUILDER_OF = {'.parquet': 'parquet', '.arrow': 'arrow', '.jsonl': 'json', '.json': 'json', '.jsonl.gz': 'json',
                 '.json.gz': 'json', '.csv': 'csv', '.txt': 'text'}
WITHOUT_DATASETS = ("or pass the files with --input (text, JSONL, Parquet, Arrow, save_to_disk folders: "
                    "read without `datasets`)")


def open_hf_dataset(name, split='train', data_files=None):
    """datasets.load_dataset(name, data_files=data_files, split=split, streaming=True): name is a hub
    name, a local dataset folder or script, a builder ('parquet', 'json', 'csv', 'text', 'arrow') for
    data_files (files or globs), or one local data file. Opened before anything is written (a missing
    file, an unknown name or an unreachable hub costs no old data set); any failure is one line."""
    if os.path.isdir(name) and is_saved_dataset(name):  # load_dataset cannot read these; pyarrow can
        raise PrepareError(f"{name} is a datasets.save_to_disk folder: pass it with --input (and --hf_split for "
                           f"a DatasetDict)")
    if data_files is None and os.path.isfile(name):  # one data file: its builder reads it
        builder = next((b for suffix, b in HF_BUILDER_OF.items() if name.endswith(suffix)), None)
        if builder is None:
            raise PrepareError(f"--hf_dataset {name}: a file that no datasets builder reads by its name "
                               f"({' '.join(HF_BUILDER_OF)}); {WITHOUT_DATASETS}")
        name, data_files = builder, [name]
    try:
        import datasets
    except ImportError:
        raise PrepareError(f"--hf_dataset needs the `datasets` package, which is not installed: pip install "
                           f"datasets, {WITHOUT_DATASETS}") from None
    files = f" data_files {' '.join(data_files)}" if data_files else ''
    try:
        return datasets.load_dataset(name, data_files=data_files, split=split, streaming=True)
    except Exception as e:  # offline, unknown name, no such file or split, ...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
        hub = '' if data_files or os.path.exists(name) else '; the hub may be unreachable'
        raise PrepareError(f"could not read Hugging Face dataset {name!r}{files} split {split!r} "
                           f"({type(e).__name__}: {reason}){hub}; {WITHOUT_DATASETS}") from None


def hf_documents(dataset, where, text_field='text', problems=None):
    """The --text_field of each record of an opened dataset (open_hf_dataset), streaming."""
    try:
        for number, record in enumerate(dataset, 1):
            text = document_from_record(record, text_field, f"{where} record {number}", problems)
            if text is not None:
                yield text
    except PrepareError:
        raise
    except Exception as e:  # a broken file, the hub gone midway, ...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
        raise PrepareError(f"could not read {where} ({type(e).__name__}: {reason}); {WITHOUT_DATASETS}") from None


def read_hf_dataset(name, split='train', text_field='text', problems=None, data_files=None):
    """Stream a Hugging Face dataset's documents (open_hf_dataset's arguments)."""
    yield from hf_documents(open_hf_dataset(name, split, data_files), f"{name}[{split}]", text_field, problems)


def no_documents_error(source, problems):
    if not problems:
        return PrepareError(f"no documents in {source}: the input is empty")
    message = f"no documents in {source}: " + '; '.join(describe_problems(problems))
    if 'missing_field' in problems:
        message += "; name the field that holds the text with --text_field"
    return PrepareError(message)


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
# shared with data/prepare_chat.py: settings, the output folder, progress, warnings

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


def output_files(out_dir):
    """The files in out_dir that a preparation writes (OUTPUT_FILE); a missing folder has none."""
    return sorted(n for n in os.listdir(out_dir) if OUTPUT_FILE.match(n)) if os.path.isdir(out_dir) else []


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
            keep |= {name, 'tokenizer.vocab'} if name == 'tokenizer.model' else {name}
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


def write_output(out_dir, overwrite, tokenizer, write):
    """
    Run write(), which prepares out_dir, the way the command lines do. A folder that already holds a data
    set or part of one is refused unless overwrite; then its files go first (meta.json before anything
    else; tokenizer files that already hold `tokenizer` stay; files that are not ours are never touched).
    An error or Ctrl-C removes what was written, so the folder never holds a data set that looks complete
    and is not, and exits with one line (130 after Ctrl-C).
    """
    try:
        keep = files_holding(out_dir, tokenizer)
        old = [name for name in output_files(out_dir) if name not in keep]
    except OSError as e:  # an unreadable folder
        sys.exit(f"error: {error_line(e, out_dir)}")
    if old and not overwrite:
        listing = ', '.join(old[:3]) + (f" and {len(old) - 3} more" if len(old) > 3 else '')
        sys.exit(f"error: {out_dir} already holds a prepared data set or part of one ({listing}); "
                 f"pass --overwrite to replace it, or choose another --out")
    created = not os.path.isdir(out_dir)
    try:
        remove_output(out_dir, old)
        write()
    except BaseException as e:
        with contextlib.suppress(OSError):  # best effort: the error that stopped the run is the one to report
            remove_output(out_dir, [name for name in output_files(out_dir) if name not in keep])
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
                if name == 'tokenizer.model':
                    keep.add('tokenizer.vocab')  # written beside this very model (tokenizer.py, train:VOCAB)
            else:
                write_atomic(path, description[field])
            keep.add(name)
            description['path'] = name  # relative to the data folder
    for name in TOKENIZER_FILES:
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
    path = os.path.join(out_dir, 'tokenizer.json' if bytelevel else 'tokenizer.model')
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


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Tokenize a corpus into .bin shards + meta.json (see the top of this file).")
    parser.add_argument('--input', nargs='+', help="text, JSONL, Parquet or Arrow files, folders (also "
                                                   "datasets.save_to_disk folders) or globs")
    parser.add_argument('--hf_dataset', help="read with the `datasets` package: a hub name, a local dataset folder or "
                                             "script, one data file, or a builder (parquet, json, csv, text, arrow) "
                                             "with --data_files")
    parser.add_argument('--data_files', nargs='+', help="files or globs for --hf_dataset (load_dataset's data_files)")
    parser.add_argument('--hf_split', default='train', help="the split of --hf_dataset or of a saved DatasetDict")
    parser.add_argument('--text_field', default='text', help="the JSONL / Parquet / Arrow / dataset field holding the text")
    parser.add_argument('--doc_per', choices=['block', 'line', 'file'], default='block',
                        help="text files: a document per blank-line-separated block, per line, or per file")
    parser.add_argument('--tokenizer', required=True,
                        help="bytes | tiktoken:NAME | path/to/tokenizer.model | path/to/tokenizer.json | an HF model "
                             "folder | train:VOCAB (SentencePiece BPE) | train-bytelevel:VOCAB (byte-level BPE)")
    parser.add_argument('--out', required=True, help="the data folder to write, e.g. data/mycorpus")
    parser.add_argument('--val_fraction', type=float, default=0.005)
    parser.add_argument('--shard_tokens', type=int, default=100_000_000)
    parser.add_argument('--num_proc', type=int, default=1,
                        help="tokenizing processes, one thread each; with 1, SentencePiece and tiktoken already use "
                             "threads. Worth raising for big corpora on many cores (the output does not change)")
    parser.add_argument('--seed', type=int, default=1337)
    parser.add_argument('--sample_bytes', type=int, default=200_000_000, help="train:VOCAB trains on at most this much text")
    parser.add_argument('--overwrite', action='store_true',
                        help="replace the data set already in --out (its shards, meta.json and tokenizer files)")
    args = parser.parse_args(argv)
    if bool(args.input) == bool(args.hf_dataset):
        parser.error("give either --input or --hf_dataset")
    if args.data_files and not args.hf_dataset:
        parser.error("--data_files goes with --hf_dataset (e.g. --hf_dataset parquet --data_files 'x/*.parquet'); "
                     "--input reads files itself")
    vocab_size = None
    bytelevel = args.tokenizer.startswith('train-bytelevel:')
    if args.tokenizer.startswith(('train:', 'train-bytelevel:')):
        try:
            vocab_size = int(args.tokenizer.split(':', 1)[1])
        except ValueError:
            parser.error(f"--tokenizer {args.tokenizer}: expected train:VOCAB or train-bytelevel:VOCAB with VOCAB a "
                         f"number, e.g. train:8192")

    # every check that can fail before anything is written: a bad setting never costs the old data set
    try:
        check_settings(args.val_fraction, args.shard_tokens, args.num_proc)
        if args.sample_bytes < 1:
            raise PrepareError(f"sample_bytes must be positive, got {args.sample_bytes}")
        if vocab_size is not None:
            try:
                check_vocab_size(vocab_size)
            except ValueError as e:
                raise PrepareError(f"--tokenizer {args.tokenizer}: {e}") from None
        if args.input:
            paths = expand_inputs(args.input, args.hf_split)
            check_inputs(paths, args.text_field)
            source = ' '.join(args.input)
            total_bytes = sum(os.path.getsize(p) for p in paths)
            compressed = ('.gz',) + JSONL_SUFFIXES + COLUMNAR_SUFFIXES  # file bytes are not text bytes
            progress_total = total_bytes if not any(p.endswith(compressed) for p in paths) else None
            def read(problems):
                return read_documents(paths, args.doc_per, args.text_field, problems)
        else:
            source, total_bytes, progress_total = f"hf:{args.hf_dataset}[{args.hf_split}]", None, None
            if args.data_files:
                source += ' ' + ' '.join(args.data_files)
            dataset = open_hf_dataset(args.hf_dataset, args.hf_split, args.data_files)
            def read(problems):
                return hf_documents(dataset, source, args.text_field, problems)
        given = None if vocab_size is not None else open_tokenizer(args.tokenizer)
    except (PrepareError, OSError) as e:
        sys.exit(f"error: {error_line(e, args.out)}")

    def write():
        tokenizer = given if vocab_size is None else train_tokenizer_on_input(
            read, vocab_size, args.out, args.sample_bytes, total_bytes, args.seed, source, bytelevel)
        problems = {}
        prepare(read(problems), tokenizer, args.out, val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                num_proc=args.num_proc, seed=args.seed, problems=problems, source=source,
                progress_total=progress_total, extra_meta={'text_field': args.text_field, 'doc_per': args.doc_per})
    write_output(args.out, args.overwrite, given, write)


if __name__ == '__main__':
    main()
