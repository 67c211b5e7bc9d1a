"""
Train a tokenizer for a new language: SentencePiece (BPE or unigram, byte fallback) or a byte-level BPE
as GPT-2, Llama 3 and cucafera have (tokenizer.json). No <unk> ever; digits split; chat tokens as single
pieces. Every Nth block of the input is held out and the new tokenizer is compared with raw bytes on it.

    python tokenizer.py --input 'corpus/*.txt' --vocab_size 8192 --out data/x/tokenizer.model
    python tokenizer.py --input 'corpus/*.txt' --vocab_size 8192 --model_type bytelevel --out data/x/tokenizer.json

A general-purpose English tokenizer such as GPT-2's spends 3-10x more tokens on Hindi or
Bengali than on English; a tokenizer trained on your own language is the cheapest big win.
The tokenizer interface itself (load_tokenizer, encode, decode) is mirim/tokenizer.py.

--out names a new file: one already there (and, for SentencePiece, the .vocab listing written beside
it) is replaced only with --overwrite, and is checked before any text is read. The tokenizer file of a
prepared data set (a meta.json beside it) is never replaced, not even with --overwrite: its shards hold
that tokenizer's ids. Train the new one elsewhere and prepare the data set again with it
(data/prepare.py --tokenizer NEW.model --out data/x --overwrite copies it in).
"""

import os
import sys
import time

from mirim.atomic import claim_file
from mirim.configurator import settings
from mirim.tokenizer import (DEFAULT_SPECIAL_TOKENS, expand_paths, read_blocks, SENTENCEPIECE_VOCAB_FILE,
                             TOKENIZER_FILES, tokenizer_stats, train_bytelevel_bpe, train_sentencepiece)

DATA_SET_FILES = {name for _, name in TOKENIZER_FILES.values()} | {SENTENCEPIECE_VOCAB_FILE}  # beside meta.json


def compare_with_bytes(tok, texts):
    """Lines comparing tok with the raw-bytes tokenizer on texts, for printing."""
    texts = list(texts)
    s = tokenizer_stats(tok, texts)
    b = tokenizer_stats('bytes', texts)
    return [f"held-out text: {s['documents']:,} texts, {s['bytes']:,} bytes, {s['words']:,} words",
            f"  {tok.kind:<13} {s['tokens']:>11,} tokens  {s['bytes_per_token']:5.2f} bytes/token  "
            f"{s['tokens_per_word']:5.2f} tokens/word  {s['unknown_tokens']} unknown",
            f"  {'bytes':<13} {b['tokens']:>11,} tokens  {b['bytes_per_token']:5.2f} bytes/token  "
            f"{b['tokens_per_word']:5.2f} tokens/word",
            f"  -> {b['tokens'] / max(s['tokens'], 1):.2f}x fewer tokens than raw bytes"]


DEFAULTS = dict(
    input=[],                 # text files or globs; a document is a blank-line-separated block
    out='',                   # the file to write: data/x/tokenizer.model (SentencePiece) or data/x/tokenizer.json
                              # (--model_type bytelevel)
    vocab_size=8192,          # pieces in the tokenizer
    model_type='bpe',         # bpe | unigram: SentencePiece; bytelevel: byte-level BPE with `tokenizers`
                              # (tokenizer.json)
    special_tokens=list(DEFAULT_SPECIAL_TOKENS),  # single pieces, never split: the chat markers
    character_coverage=0.9995,  # 0.9995 suits any script; 1.0 gives each character of a clean small alphabet a piece
    input_sentence_size=2_000_000,  # at most this many training pieces (line groups), sampled at random
    num_threads=os.cpu_count(),  # SentencePiece's training threads
    held_out_every=100,       # every Nth block is held out for the stats
    max_held_out=20_000,      # at most this many held-out blocks
    verbose=False,            # show SentencePiece's own log
    overwrite=False,          # replace the --out file (and its .vocab) if already there (refused otherwise)
)


def claim_out(out, sentencepiece, overwrite):
    """The rule of every command that writes (mirim/atomic.py), before any text is read: ValueError (one line)
    for an --out already there unless overwrite, and, even with overwrite, for a prepared data set's tokenizer."""
    targets = [out]
    if sentencepiece:
        vocab = os.path.splitext(out)[0] + '.vocab'  # train_sentencepiece writes the pieces there, for reading
        if vocab == out:
            raise ValueError(f"--out {out}: the .vocab beside a SentencePiece model is its listing of pieces; "
                             f"name the model *.model")
        targets.append(vocab)
    for target in targets:
        folder = os.path.dirname(target) or '.'
        if os.path.basename(target) in DATA_SET_FILES and os.path.exists(target) and \
                os.path.isfile(os.path.join(folder, 'meta.json')):
            raise ValueError(f"{target} belongs to the prepared data set in {folder} (meta.json), whose shards hold "
                             f"its ids: --overwrite never replaces it; write the new tokenizer elsewhere, then "
                             f"data/prepare.py --tokenizer NEW --out {folder} --overwrite")
        claim_file(target, overwrite, '--out')


def main(argv=None):
    args = settings(DEFAULTS, argv, help_source=__file__, required=('input', 'out'), choices={'model_type': ['bpe',
                    'unigram', 'bytelevel']})
    if args.held_out_every < 1 or args.num_threads < 1 or args.max_held_out < 0 or args.input_sentence_size < 1:
        sys.exit("tokenizer.py: error: --held_out_every, --num_threads and --input_sentence_size must be at least 1, "
                 "--max_held_out at least 0")
    if os.path.isdir(args.out):
        sys.exit(f"tokenizer.py: error: --out {args.out} is a folder: name the .model file, e.g. "
                 f"{os.path.join(args.out, 'tokenizer.model')}")

    try:
        if args.model_type == 'bytelevel' and not args.out.endswith('.json'):
            raise ValueError(f"--out {args.out}: a byte-level BPE is a tokenizer.json; name the file *.json")
        claim_out(args.out, args.model_type != 'bytelevel', args.overwrite)
    except ValueError as e:
        sys.exit(f"tokenizer.py: error: {e}")

    held_out = []

    def blocks_for_training():  # every Nth block goes to held_out instead of training
        for n, block in enumerate(read_blocks(expand_paths(args.input))):
            if n % args.held_out_every == args.held_out_every - 1 and len(held_out) < args.max_held_out:
                held_out.append(block)
            else:
                yield block

    t0 = time.time()
    try:
        if args.model_type == 'bytelevel':
            tok = train_bytelevel_bpe(blocks_for_training(), args.out, vocab_size=args.vocab_size,
                                      special_tokens=args.special_tokens, verbose=args.verbose)
        else:
            tok = train_sentencepiece(blocks_for_training(), args.out, vocab_size=args.vocab_size,
                                      model_type=args.model_type, special_tokens=args.special_tokens,
                                      character_coverage=args.character_coverage,
                                      input_sentence_size=args.input_sentence_size, num_threads=args.num_threads,
                                      verbose=args.verbose)
    except (ValueError, OSError) as e:  # bad input, settings or --out: a message, not a traceback
        sys.exit(f"tokenizer.py: error: {e}")
    print(f"wrote {args.out} ({tok.vocab_size:,} pieces, {args.model_type}) in {time.time() - t0:.1f}s")
    if held_out:
        print('\n'.join(compare_with_bytes(tok, held_out)))


if __name__ == '__main__':
    main()
