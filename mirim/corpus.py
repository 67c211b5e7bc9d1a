"""
Reading documents from text, JSONL, Parquet and Arrow files (also datasets.save_to_disk folders) and
Hugging Face datasets, lazily, one document at a time; the strict record readers that fine-tuning
data uses (mirim/chat_data.py, mirim/pref_data.py); the checks that run on the inputs before anything
is written. data/prepare.py is the command; its docstring says what each input format gives.
"""

import glob
import gzip
import json
import os
import zlib

TEXT_SUFFIXES = ('.txt', '.md', '.txt.gz', '.md.gz')
JSONL_SUFFIXES = ('.jsonl', '.json', '.jsonl.gz', '.json.gz')
COLUMNAR_SUFFIXES = ('.parquet', '.arrow')  # Hugging Face datasets' formats, read with pyarrow
INPUT_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + COLUMNAR_SUFFIXES
SAVED_DATASET_FILES = ('state.json', 'dataset_info.json', 'dataset_dict.json')  # save_to_disk's, not corpora


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
    # one file is read once, however it was named (a.txt and ./a.txt, or through a symlink loop that a
    # recursive glob walks round)
    first = {}
    for path in paths:
        first.setdefault(os.path.realpath(path), path)
    return list(first.values())


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
    format; datasets writes streams), never the whole table at once. A file that cannot be read to its end (a
    corrupt page, a file cut short) is a PrepareError naming it and the row it got to."""
    import pyarrow as pa
    rows = 0
    try:
        for batch in arrow_batches(path, columns):
            yield batch
            rows += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        kind = 'Parquet' if path.endswith('.parquet') else 'Arrow'
        message = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
        raise PrepareError(f"{path}: cannot be read as a {kind} file after row {rows} ({message}): damaged or cut "
                           f"short; copy or download it again") from None


def arrow_batches(path, columns=None):
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


def looks_like_utf16(head):
    """'UTF-16 LE' / 'UTF-16 BE' (with ', with a byte-order mark') when the first bytes of a file look like UTF-16
    text, else ''. Without a mark: most of the bytes at odd (LE) or even (BE) offsets are NUL and the others are not,
    as in UTF-16 text of a Latin alphabet; UTF-16 is not read (it is converted to UTF-8 first)."""
    for mark, name in ((b'\xff\xfe', 'UTF-16 LE'), (b'\xfe\xff', 'UTF-16 BE')):
        if head.startswith(mark) and not head.startswith(b'\xff\xfe\x00\x00'):  # not UTF-32 LE
            return f"{name} text (with a byte-order mark)"
    pairs = len(head) // 2
    if pairs < 2:
        return ''
    even, odd = head[0:2 * pairs:2], head[1:2 * pairs:2]
    for zeros, other, name in ((odd, even, 'UTF-16 LE'), (even, odd, 'UTF-16 BE')):
        if zeros.count(0) > 0.6 * pairs and other.count(0) < 0.1 * pairs:
            return f"{name} text"
    return ''


def encoding_problem(head):
    """What the first bytes of a file say it is instead of UTF-8 text, as the end of a line, or ''."""
    utf16 = looks_like_utf16(head)
    if utf16:
        return (f"it looks like {utf16}: convert it to UTF-8 first (e.g. iconv -f UTF-16 -t UTF-8 FILE > "
                f"FILE.utf8)")
    return ''


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
        try:
            with open_binary(path) as f:
                head = f.read(8192)
        except (OSError, EOFError, zlib.error) as e:  # e.g. a .gz that is not gzip, or cut within its first block
            raise PrepareError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
        if encoding_problem(head):
            raise PrepareError(f"{path} is not UTF-8: {encoding_problem(head)}")
        for magic, what in MAGIC:
            if head.startswith(magic) and not (magic == b'\x1f\x8b' and path.endswith('.gz')):
                raise PrepareError(f"{path} is not text, it looks like {what}")
        if b'\x00' in head:
            raise PrepareError(f"{path} is not text, it holds NUL bytes (a binary file, or UTF-16 text: convert "
                               f"it to UTF-8)")


def open_binary(path):
    return gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')


def read_lines(path):
    """(line number, raw bytes) for each line of a text file (.gz too): the one place a text corpus is read, so
    a file that cannot be read (a folder, a symlink loop) or stops short (a .gz cut off: EOFError; a damaged
    one: BadGzipFile, zlib.error) is a PrepareError naming it and the line it got to."""
    number = 0
    try:
        with open_binary(path) as f:
            for number, raw in enumerate(f, 1):
                yield number, raw
    except EOFError:
        raise PrepareError(f"{path}: the compressed file ends early, after line {number} (cut short: copy or "
                           f"download it again)") from None
    except (OSError, zlib.error) as e:
        where = f" after line {number}" if number else ""
        raise PrepareError(f"{path}: cannot be read{where} ({getattr(e, 'strerror', None) or e})") from None


def decoded_lines(path, problems):
    """(line number, text without its line end) for each line; invalid UTF-8 is replaced and counted. A NUL byte
    anywhere (check_inputs sniffs only the first 8 KB) stops the run naming the line: text holds none, and the
    tokenizer would learn it as text."""
    for number, raw in read_lines(path):
        if b'\x00' in raw:
            raise PrepareError(f"{path}:{number}: holds NUL bytes: not text (a binary file, or part of one, or "
                               f"UTF-16 text: convert it to UTF-8)")
        try:
            line = raw.decode('utf-8')
        except UnicodeDecodeError:
            line = raw.decode('utf-8', errors='replace')
            note(problems, 'invalid_utf8', f"{path}:{number}")
        if number == 1 and line.startswith('\ufeff'):
            line = line[1:]
        yield number, line.rstrip('\r\n')


def text_lines(path):
    """The lines of a small text file that must be clean UTF-8 (a prompts file): UTF-16, a NUL byte or bytes that
    are not UTF-8 are a PrepareError naming the file (and the line); a byte-order mark is not part of line 1."""
    problem = encoding_problem(file_head(path))
    if problem:
        raise PrepareError(f"{path}: {problem}")
    lines = []
    for number, raw in read_lines(path):
        if b'\x00' in raw:
            raise PrepareError(f"{path}:{number}: holds NUL bytes: not text")
        try:
            line = raw.decode('utf-8')
        except UnicodeDecodeError as e:
            raise PrepareError(f"{path}:{number}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
        lines.append((line[1:] if number == 1 and line.startswith('\ufeff') else line).rstrip('\r\n'))
    return lines


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
    # utf-8-sig: a byte-order mark at the start of the file is not part of the first record
    with (gzip.open(path, 'rt', encoding='utf-8-sig') if path.endswith('.gz') else open(path, encoding='utf-8-sig')) as f:
        number = 0
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                if '\x00' in line:  # UTF-16 text of ASCII decodes as UTF-8 with a NUL after each character
                    raise error(f"{where}: holds NUL bytes, not JSON text"
                                f"{'; ' + hint if (hint := encoding_problem(file_head(path))) else ''}")
                try:
                    record = json.loads(line)
                    json.dumps(record, ensure_ascii=False).encode('utf-8')  # every string of it is text
                except json.JSONDecodeError as e:
                    raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                f"JSONL needs one JSON object per line") from None
                except UnicodeEncodeError as e:
                    raise error(f"{where}: a string holds a lone surrogate ({e.object[e.start]!a}, from an escape such "
                                f"as \\ud800): not valid Unicode text") from None
                yield where, record
        except (UnicodeDecodeError, EOFError, OSError) as e:  # EOFError, OSError: a cut or corrupt .gz
            what = ("not UTF-8 text (a binary file, or another encoding): JSONL is UTF-8"
                    if isinstance(e, UnicodeDecodeError) else f"cannot be read to the end ({e})")
            if isinstance(e, UnicodeDecodeError) and encoding_problem(file_head(path)):
                what = f"not UTF-8 text: {encoding_problem(file_head(path))}"
            raise error(f"{path}:{number + 1}: {what}") from None


def file_head(path, size=8192):
    """The first bytes of a file (uncompressed for .gz); b'' when they cannot be read."""
    try:
        with open_binary(path) as f:
            return f.read(size)
    except (OSError, EOFError, zlib.error):
        return b''


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
