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
a progress bar shows; in a log (stderr not a terminal) a plain line every minute (PROGRESS_EVERY in
mirim/prepare.py).

The library part is in mirim/: mirim/corpus.py reads the documents, mirim/prepare.py's
prepare(documents, tokenizer, out_dir, ...) writes the shards (mirim/biblia.py calls it too).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from mirim.configurator import settings  # noqa: E402
from mirim.corpus import (check_inputs, COLUMNAR_SUFFIXES, expand_inputs, hf_documents, JSONL_SUFFIXES,  # noqa: E402
                          open_hf_dataset, PrepareError, read_documents)
from mirim.prepare import (check_settings, error_line, open_tokenizer, prepare, train_tokenizer_on_input,  # noqa: E402
                           write_output)
from mirim.tokenizer import check_vocab_size  # noqa: E402

DEFAULTS = dict(
    input=[],                 # text, JSONL, Parquet or Arrow files, folders (also datasets.save_to_disk folders)
                              # or globs
    hf_dataset='',            # instead of --input, read with the `datasets` package: a hub name, a local dataset
                              # folder or script, one data file, or a builder (parquet, json, csv, text, arrow)
                              # with --data_files
    data_files=[],            # files or globs for --hf_dataset (load_dataset's data_files)
    hf_split='train',         # the split of --hf_dataset or of a saved DatasetDict
    text_field='text',        # the JSONL / Parquet / Arrow / dataset field holding the text
    doc_per='block',          # block | line | file: text files give a document per blank-line-separated block,
                              # per line, or per file
    tokenizer='',             # bytes | tiktoken:NAME | path/to/tokenizer.model | path/to/tokenizer.json | an HF
                              # model folder | train:VOCAB (SentencePiece BPE) | train-bytelevel:VOCAB (byte-level BPE)
    out='',                   # the data folder to write, e.g. data/mycorpus
    val_fraction=0.005,       # the share of documents that go to val
    shard_tokens=100_000_000,  # tokens per shard file
    num_proc=1,               # tokenizing processes, one thread each; with 1, SentencePiece and tiktoken already use
                              # threads. Worth raising for big corpora on many cores (the output does not change)
    seed=1337,                # which document of each group goes to val
    sample_bytes=200_000_000,  # train:VOCAB trains on at most this much text
    overwrite=False,          # replace the data set already in --out (its shards, meta.json and tokenizer files)
)


def main(argv=None):
    args = settings(DEFAULTS, argv, help_source=__file__, required=('tokenizer', 'out'),
                    choices={'doc_per': ['block', 'line', 'file']})
    if bool(args.input) == bool(args.hf_dataset):
        sys.exit("error: give either --input or --hf_dataset")
    if args.data_files and not args.hf_dataset:
        sys.exit("error: --data_files goes with --hf_dataset (e.g. --hf_dataset parquet --data_files 'x/*.parquet'); "
                 "--input reads files itself")
    vocab_size = None
    bytelevel = args.tokenizer.startswith('train-bytelevel:')
    if args.tokenizer.startswith(('train:', 'train-bytelevel:')):
        try:
            vocab_size = int(args.tokenizer.split(':', 1)[1])
        except ValueError:
            sys.exit(f"error: --tokenizer {args.tokenizer}: expected train:VOCAB or train-bytelevel:VOCAB with VOCAB "
                     f"a number, e.g. train:8192")

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
            dataset = open_hf_dataset(args.hf_dataset, args.hf_split, args.data_files or None)
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
