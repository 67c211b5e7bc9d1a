"""
Preference pairs (JSONL) -> token shards + loss masks, for preference tuning (DPO) with dpo.py.

    python data/prepare_pref.py --input pairs.jsonl --model out/biblia-pt-chat --out data/mypref
    python data/prepare_pref.py --input train.jsonl --val_input val.jsonl --tokenizer data/biblia/pt/tokenizer.model \\
        --template chatml --max_length 512 --out data/mypref

One pair per JSONL line, in any of the common spellings:
    {"prompt": "...", "chosen": "...", "rejected": "..."}                          (TRL, most sets)
    {"instruction": "...", "chosen_response": "...", "rejected_response": "..."}  (reward-aira-dataset)
    {"question": "...", "chosen": "...", "rejected": "..."}                        (Catalan-DPO)
    {"messages": [{"role": ..., "content": ...}, ...], "chosen": "...", "rejected": "..."}
An optional "system" string comes first. The prompt may also be a list of messages, and chosen /
rejected lists of assistant messages, or whole conversations that start with the prompt (TRL's
conversational and implicit-prompt forms: the messages both share are the prompt).

Each side of a pair is rendered with the model's chat template (chat.py: --model takes the tokenizer
and template of a fine-tuned checkpoint) as one document, <bos> prompt reply. Its mask (shards.py)
marks with 1 the reply's tokens and its end marker only: earlier assistant turns of a multi-turn
prompt are context, like the rest of the prompt.

The format (so the data stays readable by shards.py and handled by mirim/prepare.py's output rules):
train_*.bin + train_*.mask.bin hold the documents of pair 0 (chosen, then rejected), pair 1, ...;
every document starts with <bos>, which no text can produce, so the documents are found again by
their <bos> (mirim/pref_data.py's read_pairs), and meta.json's pair counts check that. Pairs are
kept whole and in order, so a pair never straddles two shards.

Pairs longer than --max_length tokens are truncated prompt first: the prompt loses its oldest tokens
(after <bos>; the template's reply header stays), by the same amount on both sides; a reply is cut
at the end only when the prompt is gone. The counts are printed and kept in meta.json ("preference").

A record that is not a pair stops the run with its file and line. A pair whose chosen and rejected
replies are the same teaches nothing: it is skipped and counted (printed, and in meta.json).

The output folder is handled as data/prepare.py does: refused when it holds a data set unless
--overwrite, and never left with a data set that looks complete after an error or Ctrl-C.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from mirim.chat import CHAT_TEMPLATES  # noqa: E402
from mirim.chat_data import check_template_tokens  # noqa: E402
from mirim.configurator import settings  # noqa: E402
from mirim.corpus import PrepareError  # noqa: E402
from mirim.pref_data import prepare_pref, read_pairs_jsonl  # noqa: E402
from mirim.prepare import check_settings, error_line, open_tokenizer, write_output  # noqa: E402
from mirim.tokenizer import load_tokenizer  # noqa: E402

DEFAULTS = dict(
    input='',                 # JSONL of preference pairs (.jsonl or .jsonl.gz)
    val_input='',             # JSONL of held-out pairs (instead of --val_fraction)
    model='',                 # the fine-tuned (SFT) checkpoint or out_dir: its tokenizer and chat template
    tokenizer='',             # instead of --model: path/to/tokenizer.model | tiktoken:NAME | bytes
    template='',              # the chat template: chatml | aira; '' = the --model's, else chatml
    out='',                   # the data folder to write, e.g. data/mypref
    max_length=1024,          # tokens per side at most (keep it <= the model's block_size); longer pairs are
                              # truncated prompt first
    val_fraction=0.05,        # the share of pairs that go to val (without --val_input)
    shard_tokens=100_000_000,  # tokens per shard file
    seed=1337,                # which pairs go to val
    overwrite=False,          # replace the data set already in --out (its shards, masks, meta.json and tokenizer file)
)


def main(argv=None):
    args = settings(DEFAULTS, argv, help_source=__file__, required=('input', 'out'),
                    choices={'template': sorted(CHAT_TEMPLATES)})
    try:  # everything that can fail before a file is written: a bad setting never costs the old data set
        if bool(args.model) == bool(args.tokenizer):
            raise PrepareError("give --model (a fine-tuned checkpoint: its tokenizer and chat template) or "
                               "--tokenizer, one of them")
        check_settings(args.val_fraction, args.shard_tokens)
        if args.max_length < 8:
            raise PrepareError(f"--max_length {args.max_length} is too short for a prompt and a reply (at least 8)")
        for path in filter(None, [args.input, args.val_input]):
            if not os.path.isfile(path):
                raise PrepareError(f"input not found: {path}")
        if args.model:
            from mirim.checkpoint import load_checkpoint, resolve
            kind, where = resolve(args.model)
            if kind != 'mirim':
                raise PrepareError(f"--model {args.model}: a Hugging Face folder; give --tokenizer and --template")
            tokenizer = load_tokenizer(load_checkpoint(where)['tokenizer'])
        else:
            tokenizer = open_tokenizer(args.tokenizer)
        template = args.template or tokenizer.chat_template or 'chatml'
        check_template_tokens(tokenizer, template)
    except (PrepareError, OSError, ValueError) as e:  # CheckpointError is a ValueError
        sys.exit(f"error: {error_line(e, args.out)}")

    def write():
        val = read_pairs_jsonl(args.val_input) if args.val_input else None
        source = args.input + (f" + {args.val_input} (val)" if args.val_input else '')
        prepare_pref(read_pairs_jsonl(args.input), tokenizer, template, args.out, max_length=args.max_length,
                     val_fraction=args.val_fraction, val_pairs=val, seed=args.seed, shard_tokens=args.shard_tokens,
                     source=source, extra_meta={'input': args.input})
    write_output(args.out, args.overwrite, tokenizer, write)


if __name__ == '__main__':
    main()
