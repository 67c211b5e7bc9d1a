"""
SentencePiece BPE vs byte-level BPE on the embedded Bible: for each language, train both at the
same vocab on the train books (as data/biblia/prepare.py does), then measure on the held-out books
(VAL_BOOKS): training time, tokens per word ("fertility"), bytes per token, and the throughput of
mirim/prepare.py's prepare() (tokenize + write shards) over the whole Bible, in MB/s.

    python tools/compare_tokenizers.py                          # pt, hi, zh at 4096 pieces
    python tools/compare_tokenizers.py --langs=pt,bn,sw --vocab_size=8192 --repeat=2

Times are wall-clock on whatever else the machine is doing: run it on a quiet machine, and more
than once (--repeat) to see how much they move. Tokens per word is left out for languages
written without spaces (zh, ja), where a "word" is a whole clause.
"""
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mirim.biblia import CJK, connect, database_path, DEFAULT_TRANSLATION, documents  # noqa: E402
from mirim.configurator import settings  # noqa: E402
from mirim.prepare import prepare  # noqa: E402
from mirim.tokenizer import tokenizer_stats, train_bytelevel_bpe, train_sentencepiece  # noqa: E402

KINDS = {'sentencepiece': 'SentencePiece BPE', 'bytelevel': 'byte-level BPE'}

DEFAULTS = dict(
    langs='pt,hi,zh',         # comma-separated languages (see data/biblia/prepare.py --list)
    vocab_size=4096,          # pieces in both tokenizers
    repeat=1,                 # measure each this many times (times move on a busy machine)
)


def measure(kind, lang, train_docs, val_docs, vocab_size, work_dir):
    """Train one tokenizer kind on train_docs -> one row of numbers."""
    t0 = time.perf_counter()
    if kind == 'sentencepiece':
        coverage = 0.9995 if lang in CJK else 1.0  # as mirim/biblia.py's build
        tok = train_sentencepiece(iter(train_docs), os.path.join(work_dir, 'tokenizer.model'),
                                  vocab_size=vocab_size, character_coverage=coverage)
    else:
        tok = train_bytelevel_bpe(iter(train_docs), os.path.join(work_dir, 'tokenizer.json'), vocab_size=vocab_size)
    train_s = time.perf_counter() - t0
    s = tokenizer_stats(tok, val_docs)
    # prepare() over the whole Bible, documents already in memory: tokenizing and writing, no reading
    total_bytes = sum(len(d.encode('utf-8')) for d in train_docs + val_docs)
    t0 = time.perf_counter()
    prepare(iter(train_docs), tok, os.path.join(work_dir, 'data'), val_documents=iter(val_docs))
    prepare_s = time.perf_counter() - t0
    return dict(lang=lang, kind=kind, train_s=train_s, tokens_per_word=s['tokens_per_word'],
                bytes_per_token=s['bytes_per_token'], mb_per_s=total_bytes / 1e6 / prepare_s)


def main(argv=None):
    args = settings(DEFAULTS, argv, help_source=__file__)
    langs = [lang for lang in args.langs.split(',') if lang]
    unknown = [lang for lang in langs if lang not in DEFAULT_TRANSLATION]
    if unknown or not langs:
        sys.exit(f"compare_tokenizers.py: error: unknown language {', '.join(unknown) or '(none)'}; "
                 f"choose from {' '.join(DEFAULT_TRANSLATION)}")

    db = connect(database_path())
    rows = []
    for lang in langs:
        letter = DEFAULT_TRANSLATION[lang]
        train_docs = list(documents(db, [letter], 'train'))
        val_docs = list(documents(db, [letter], 'val'))
        for kind in KINDS:
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as work_dir:
                    rows.append(measure(kind, lang, train_docs, val_docs, args.vocab_size, work_dir))

    print(f"\n{args.vocab_size} pieces, trained on the train books, measured on the held-out books; "
          f"{os.cpu_count()} CPU cores")
    print("| lang | tokenizer | training (s) | tokens/word | bytes/token | prepare.py (MB/s) |")
    print("|---|---|---|---|---|---|")
    for lang in langs:
        for kind in KINDS:
            mine = [r for r in rows if r['lang'] == lang and r['kind'] == kind]

            def span(key, fmt):
                low, high = min(r[key] for r in mine), max(r[key] for r in mine)
                return fmt.format(low) if fmt.format(low) == fmt.format(high) else f"{fmt.format(low)}-{fmt.format(high)}"
            fertility = '-' if lang in CJK else span('tokens_per_word', '{:.2f}')
            print(f"| {lang} | {KINDS[kind]} | {span('train_s', '{:.1f}')} | {fertility} | "
                  f"{span('bytes_per_token', '{:.2f}')} | {span('mb_per_s', '{:.2f}')} |")


if __name__ == '__main__':
    main()
