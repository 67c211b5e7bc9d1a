"""
Chat conversations (JSONL, Parquet, Arrow) -> token shards + loss-mask shards, for chat fine-tuning (SFT) with train.py.

    python data/prepare_chat.py --input conv.jsonl --tokenizer data/biblia/pt/tokenizer.model \\
        --template chatml --out data/mychat
    python data/prepare_chat.py --input train.jsonl --val_input val.jsonl --tokenizer ... --out data/mychat

One conversation per JSONL line (or Parquet / Arrow row, also in a datasets.save_to_disk folder), either of
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}    (one user turn, one reply; an optional "system" string)

Each conversation is rendered with a chat template of chat.py (chatml, aira) and written as one
document, <bos> conversation <eos>. The mask shard beside each token shard (shards.py) marks with 1
the tokens the model learns to produce: every assistant reply and the marker that ends it
(<|im_end|> in ChatML, </s> in Aira). Role headers, system and user turns are context only: their
mask is 0, the sampler turns their targets into -100, and the loss skips them.

The template's markers (<|im_start|>, <|im_end|>; <instruction>, </instruction>) must be single
tokens of the tokenizer, or the model would have to spell them. Tokenizers trained by tokenizer.py
have the ChatML ones; for others, train the tokenizer with them (--special_tokens), or pick a
template whose markers it has. The template is stored in meta.json ("chat_template", and in
"tokenizer"), so train.py puts it in the checkpoint and sample.py --chat and export.py use it.

A record that is not a conversation stops the run with its file and line: chat sets are small and
curated, and silently training on part of one is worse than fixing a line.

The output folder is handled as data/prepare.py does: refused when it holds a data set unless
--overwrite, and never left with a data set that looks complete after an error or Ctrl-C.

train.py packs conversations: it samples windows of block_size+1 tokens from their concatenation,
so a window may start inside a conversation. Keep block_size above most conversations (the
longest is printed at the end and kept in meta.json under "chat").
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from mirim.chat import CHAT_TEMPLATES  # noqa: E402
from mirim.chat_data import chat_input_files, check_template_tokens, prepare_chat, read_conversations  # noqa: E402
from mirim.configurator import settings  # noqa: E402
from mirim.corpus import PrepareError  # noqa: E402
from mirim.prepare import check_settings, error_line, open_tokenizer, write_output  # noqa: E402

DEFAULTS = dict(
    input='',                 # conversations: JSONL (.jsonl, .jsonl.gz), Parquet or Arrow files; a file, folder, glob
                              # or datasets.save_to_disk folder
    val_input='',             # validation conversations, the same way (instead of --val_fraction)
    hf_split='train',         # the split of a saved DatasetDict
    tokenizer='',             # the pre-trained model's tokenizer: path/to/tokenizer.model | path/to/tokenizer.json |
                              # an HF model folder | tiktoken:NAME | bytes
    template='chatml',        # the chat template: chatml | aira (mirim/chat.py)
    out='',                   # the data folder to write, e.g. data/mychat
    val_fraction=0.05,        # the share of conversations that go to val (without --val_input)
    shard_tokens=100_000_000,  # tokens per shard file
    seed=1337,                # which conversations go to val
    overwrite=False,          # replace the data set already in --out (its shards, masks, meta.json and tokenizer file)
)


def main(argv=None):
    args = settings(DEFAULTS, argv, help_source=__file__, required=('input', 'tokenizer', 'out'),
                    choices={'template': sorted(CHAT_TEMPLATES)})
    try:  # everything that can fail before a file is written: a bad setting never costs the old data set
        check_settings(args.val_fraction, args.shard_tokens)
        for pattern in filter(None, [args.input, args.val_input]):
            chat_input_files(pattern, args.hf_split)
        tokenizer = open_tokenizer(args.tokenizer)
        check_template_tokens(tokenizer, args.template)
    except (PrepareError, OSError) as e:
        sys.exit(f"error: {error_line(e, args.out)}")

    def write():
        val = read_conversations(args.val_input, args.hf_split) if args.val_input else None
        source = args.input + (f" + {args.val_input} (val)" if args.val_input else '')
        prepare_chat(read_conversations(args.input, args.hf_split), tokenizer, args.template, args.out,
                     val_fraction=args.val_fraction, val_conversations=val, seed=args.seed,
                     shard_tokens=args.shard_tokens, source=source, extra_meta={'input': args.input})
    write_output(args.out, args.overwrite, tokenizer, write)


if __name__ == '__main__':
    main()
