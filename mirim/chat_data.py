"""
Chat conversations -> token shards + loss-mask shards, for chat fine-tuning (SFT) with train.py:
reading conversations (JSONL, Parquet, Arrow), checking that a chat template's markers are single
tokens of the tokenizer, and prepare_chat(), the core. data/prepare_chat.py is the command; its
docstring says which records are conversations and what the masks mark.
"""

import itertools
import re
import sys
import time

import numpy as np
from tqdm import tqdm

from mirim.chat import chat_ids, get_template, render_chat, ROLES
from mirim.corpus import (check_inputs, COLUMNAR_SUFFIXES, columnar_records, expand_inputs, JSONL_SUFFIXES,
                          jsonl_records, PrepareError)
from mirim.prepare import (abort_split_writers, check_settings, close_split_writers, labelled_splits,
                           open_split_writers, PlainProgress, tokenizer_fields, val_share_warning)
from mirim.shards import write_meta
from mirim.tokenizer import DEFAULT_SPECIAL_TOKENS, load_tokenizer

FORMATS = ('{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]} '
           'or {"prompt": "...", "completion": "..."}')


# -----------------------------------------------------------------------------
# reading conversations

def conversation_messages(record, where):
    """A JSONL record -> its list of messages; PrepareError naming `where` when it is not a conversation."""
    if isinstance(record, dict) and 'messages' in record:
        messages = record['messages']
        if not isinstance(messages, list) or not messages:
            raise PrepareError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}}")
    elif isinstance(record, dict) and 'prompt' in record and 'completion' in record:
        fields = {k: record[k] for k in ('system', 'prompt', 'completion') if k in record}
        wrong = [k for k, v in fields.items() if not isinstance(v, str)]
        if wrong:
            raise PrepareError(f"{where}: {', '.join(repr(k) for k in wrong)} must be a string")
        messages = [{'role': 'system', 'content': record['system']}] if 'system' in record else []
        messages += [{'role': 'user', 'content': record['prompt']},
                     {'role': 'assistant', 'content': record['completion']}]
    else:
        have = ', '.join(map(repr, record)) if isinstance(record, dict) else f"a {type(record).__name__}"
        raise PrepareError(f"{where}: not a conversation (it has {have or 'no fields'}); each line must be {FORMATS}")
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or message.get('role') not in ROLES or not isinstance(message.get('content'), str):
            raise PrepareError(f"{where}: message {n} must be {{'role': one of {', '.join(ROLES)}, 'content': str}}, "
                               f"got {message!r:.200}")
    if not any(m['role'] == 'assistant' for m in messages):
        raise PrepareError(f"{where}: no assistant message, so nothing to train on")
    return messages


def chat_input_files(pattern, split='train'):
    """The files of --input / --val_input (a file, folder, glob or datasets.save_to_disk folder), checked:
    JSONL, Parquet or Arrow only, none of them binary in disguise. PrepareError otherwise."""
    paths = expand_inputs([pattern], split)
    check_inputs(paths, text_field=None)  # first: a binary file is named for what it looks like
    other = [path for path in paths if not path.endswith(JSONL_SUFFIXES + COLUMNAR_SUFFIXES)]
    if other:
        raise PrepareError(f"{other[0]} is not a JSONL, Parquet or Arrow file of conversations")
    return paths


def read_conversations(pattern, split='train'):
    """(where, messages) for every conversation: each non-blank line of JSONL (.jsonl, optionally gzipped),
    each row of Parquet and Arrow files."""
    for path in chat_input_files(pattern, split):
        records = columnar_records(path) if path.endswith(COLUMNAR_SUFFIXES) else jsonl_records(path)
        for where, record in records:
            yield where, conversation_messages(record, where)


# -----------------------------------------------------------------------------
# the template and the tokenizer

def template_markers(template):
    """The tag-like markers of a template, e.g. ['<|im_start|>', '<|im_end|>']; {eos} is the eos token."""
    template = get_template(template)
    texts = [template.get(k) or '' for k in ('system', 'user', 'assistant', 'generation_prompt', 'stop')]
    found = re.findall(r'<[^<>\s{}]+>', ''.join(texts).replace('{content}', ' ').replace('{eos}', ' '))
    return list(dict.fromkeys(found))


def check_template_tokens(tokenizer, template):
    """Every marker of the template must be one token of the tokenizer; raise PrepareError naming the missing."""
    missing = [m for m in template_markers(template)
               if tokenizer.token_to_id(m) is None or tokenizer.token_to_id(m) not in tokenizer.encode(m)]
    if missing:
        name = get_template(template).get('name', 'custom')
        wanted = ' '.join(f"'{m}'" for m in dict.fromkeys([*DEFAULT_SPECIAL_TOKENS, *template_markers(template)]))
        raise PrepareError(
            f"the tokenizer ({tokenizer!r}) has no single token for {', '.join(missing)}, which the {name!r} chat "
            f"template needs. Train the tokenizer with them as special tokens (python tokenizer.py ... "
            f"--special_tokens {wanted}), or use a template whose "
            f"markers it has (tokenizers trained by tokenizer.py have ChatML's: --template chatml)")


def with_template(tokenizer, template):
    """The tokenizer carrying the chat template, checked to hold its markers: the template travels
    with the tokenizer, meta.json -> train.py -> the checkpoint -> sample.py --chat."""
    tokenizer = load_tokenizer({**load_tokenizer(tokenizer).to_dict(), 'chat_template': template})
    check_template_tokens(tokenizer, template)
    return tokenizer


def encode_conversation(messages, template, tokenizer):
    """-> (ids, mask) of one document: <bos> conversation <eos>. mask 1 = trained (the replies and their
    end markers, chat.chat_ids); the closing <eos> only separates documents and is not trained, unless it
    ends a reply already (Aira)."""
    ids, mask = chat_ids(messages, template, tokenizer)
    if ids[-1] != tokenizer.eos_id:
        ids.append(tokenizer.eos_id)
        mask.append(0)
    return ids, mask


# -----------------------------------------------------------------------------
# the core: conversations -> shards + masks + meta.json

def prepare_chat(conversations, tokenizer, template, out_dir, val_fraction=0.05, val_conversations=None,
                 seed=1337, shard_tokens=100_000_000, source='the input', extra_meta=None, total=None):
    """
    Tokenize conversations (an iterable of message lists, or of (where, messages) pairs, which name the
    record in errors) into out_dir: train_*.bin + train_*.mask.bin, val_*.bin + val_*.mask.bin, the
    tokenizer file and meta.json (written last). Returns the meta dict.

    Split: one conversation in round(1/val_fraction) goes to val (mirim/prepare.py's is_val_document), or,
    when val_conversations is given, `conversations` all go to train and val_conversations to val.
    """
    t0 = time.time()
    template = dict(get_template(template))
    tokenizer = with_template(tokenizer, template)
    check_settings(val_fraction, shard_tokens)
    items = labelled_splits(conversations, val_conversations, val_fraction, seed)
    first = next(items, None)  # peek: no conversations -> nothing touched on disk
    if first is None:
        raise PrepareError(f"no conversations in {source}: the input is empty")
    writers = open_split_writers(out_dir, tokenizer.vocab_size, shard_tokens, with_mask=True)
    counts = {split: {'tokens': 0, 'trained_tokens': 0, 'bytes': 0, 'documents': 0} for split in writers}
    longest = (0, None)
    terminal = sys.stderr.isatty()  # no bar in a log, where each redraw is a line: a plain line now and then
    bar = tqdm(itertools.chain([first], items), total=total, unit=' conversations', desc=f"tokenizing -> {out_dir}",
               disable=not terminal)
    plain = PlainProgress(f"tokenizing -> {out_dir}")
    try:
        for n, (split, conversation) in enumerate(bar):
            where, messages = conversation if isinstance(conversation, tuple) else (f"conversation {n}", conversation)
            try:
                ids, mask = encode_conversation(messages, template, tokenizer)
            except ValueError as e:  # chat.py's message about a role or a message
                raise PrepareError(f"{where}: {e}") from None
            writers[split].write(np.asarray(ids), np.asarray(mask))
            c = counts[split]
            c['tokens'] += len(ids)
            c['trained_tokens'] += sum(mask)
            c['bytes'] += len(render_chat(messages, template).encode('utf-8'))
            c['documents'] += 1
            longest = max(longest, (len(ids), where), key=lambda x: x[0])
            if not terminal:
                plain.update(f"{n + 1:,} conversations", n + 1, 'conversations')
        names = close_split_writers(writers, out_dir, counts,
                                    f"all {counts['val']['documents']} conversation(s) of {source} went to val, none "
                                    f"to train: give more conversations or a smaller --val_fraction")

        conversations_total = counts['train']['documents'] + counts['val']['documents']
        warning = None if val_conversations is not None else val_share_warning(
            counts, val_fraction, 'conversation', "give more conversations, or your own with --val_input")
        meta = {
            **tokenizer_fields(tokenizer, out_dir),
            'chat_template': template,
            # bytes: UTF-8 bytes of the rendered conversations; the loss is over trained tokens only, so
            # eval.py reports no bits per byte for masked data
            'splits': {split: {**counts[split], 'shards': names[split]} for split in writers},
            'source': source,
            'val_fraction': val_fraction if val_conversations is None else None,
            'seed': seed,
            'shard_tokens': shard_tokens,
            'chat': {'template': template.get('name', 'custom'), 'longest_conversation_tokens': longest[0],
                     'longest_conversation': longest[1],
                     'mean_conversation_tokens': round((counts['train']['tokens'] + counts['val']['tokens'])
                                                       / conversations_total, 1)},
            'warnings': [warning] if warning else [],
            **(extra_meta or {}),
        }
        write_meta(out_dir, meta)
    except BaseException:
        abort_split_writers(writers, out_dir)
        raise
    finally:
        bar.close()
    for split, c in counts.items():
        print(f"{split}: {c['documents']:,} conversations, {c['tokens']:,} tokens, {c['trained_tokens']:,} trained "
              f"({c['trained_tokens'] / max(c['tokens'], 1):.0%}), {len(names[split])} shard(s)")
    print(f"conversations: {meta['chat']['mean_conversation_tokens']} tokens on average, the longest "
          f"{longest[0]} ({longest[1]}): use a block_size above most of them")
    print(f"wrote {out_dir} ({template.get('name', 'custom')} template) in {time.time() - t0:.1f}s")
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return meta
