"""
Preference pairs -> token shards + loss masks, for preference tuning (DPO) with dpo.py: reading pairs
in the common spellings (pair_messages), encoding and truncating them, prepare_pref(), the core, and
read_pairs() and read_pair_tasks(), which read a prepared set (and the task each pair names) back for
dpo.py. data/prepare_pref.py is the command; its docstring gives the record formats, the shard layout
and the truncation rule. A record may name its kind of pair in an optional "task" string
(data/biblia/make_tasks.py's pairs do: 'testament', 'book'...): meta.json keeps the task of every pair
('pair_tasks'), and dpo.py reports the held-out reward accuracy of each task.
"""

import itertools
import sys
import time
from collections import namedtuple

import numpy as np

from mirim.chat import chat_ids, common_prefix, get_template, ROLES
from mirim.chat_data import with_template
from mirim.corpus import jsonl_records, PrepareError
from mirim.prepare import (abort_split_writers, check_settings, close_split_writers, labelled_splits,
                           open_split_writers, tokenizer_fields)
from mirim.shards import mask_path, read_mask, read_shard, ShardError, split_shards, write_meta

PROMPT_KEYS = ('messages', 'prompt', 'question', 'instruction')
TASK_KEY = 'task'  # an optional field naming the kind of pair ('testament', 'book'...): dpo.py scores each kind
UNTAGGED = 'untagged'  # the task of a pair without one, in a data set where other pairs have one
REPLY_KEYS = (('chosen', 'rejected'), ('chosen_response', 'rejected_response'))
FORMATS = ('{"prompt"|"question"|"instruction"|"messages": ..., "chosen": ..., "rejected": ...} or '
           '{"instruction": ..., "chosen_response": ..., "rejected_response": ...}')


# -----------------------------------------------------------------------------
# reading pairs

def check_messages(messages, where, field):
    if not isinstance(messages, list) or not messages:
        raise PrepareError(f"{where}: {field!r} must be a string or a non-empty list of {{'role', 'content'}}")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get('role') not in ROLES or not isinstance(m.get('content'), str):
            raise PrepareError(f"{where}: {field!r} message {n} must be {{'role': one of {', '.join(ROLES)}, "
                               f"'content': str}}, got {m!r:.200}")
    return messages


def as_messages(value, role, where, field):
    """A string -> one message of `role`; a list -> checked messages."""
    if isinstance(value, str):
        if not value.strip():
            raise PrepareError(f"{where}: {field!r} is empty")
        return [{'role': role, 'content': value}]
    return check_messages(value, where, field)


class Pair(namedtuple('Pair', 'prompt chosen rejected task', defaults=(None,))):
    """A preference pair: prompt messages, chosen reply messages, rejected reply messages, and the name of its
    task (None: the record named none)."""


def pair_messages(record, where):
    """A JSONL record -> Pair(prompt messages, chosen reply messages, rejected reply messages, task); PrepareError
    naming `where` when it is not a preference pair. The task is the record's optional "task" string."""
    if not isinstance(record, dict):
        raise PrepareError(f"{where}: a {type(record).__name__}, not a preference pair; each line must be {FORMATS}")
    keys = next(((c, r) for c, r in REPLY_KEYS if c in record and r in record), None)
    if keys is None:
        have = ', '.join(map(repr, record)) or 'no fields'
        raise PrepareError(f"{where}: not a preference pair (it has {have}); each line must be {FORMATS}")
    prompt_key = next((k for k in PROMPT_KEYS if k in record), None)
    chosen, rejected = (record[k] for k in keys)
    for key in keys:
        if not isinstance(record[key], (str, list)):
            raise PrepareError(f"{where}: {key!r} must be a string or a list of messages, "
                               f"not a {type(record[key]).__name__}")
    if prompt_key is None:  # implicit prompt: two whole conversations, the shared messages are the prompt
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise PrepareError(f"{where}: no prompt (one of {', '.join(map(repr, PROMPT_KEYS))}); without one, "
                               f"{keys[0]!r} and {keys[1]!r} must be whole conversations that share the prompt")
        check_messages(chosen, where, keys[0]), check_messages(rejected, where, keys[1])
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        while shared and chosen[shared - 1]['role'] == 'assistant':  # a shared reply start is still the reply
            shared -= 1
        prompt = chosen[:shared]
    else:
        prompt = as_messages(record[prompt_key], 'user', where, prompt_key)
    if 'system' in record:
        if not isinstance(record['system'], str):
            raise PrepareError(f"{where}: 'system' must be a string")
        if prompt and prompt[0]['role'] == 'system':
            raise PrepareError(f"{where}: a 'system' field and a system message in the prompt; give one")
        prompt = [{'role': 'system', 'content': record['system']}] + prompt
    if not prompt or prompt[-1]['role'] == 'assistant':
        raise PrepareError(f"{where}: the prompt must end with a user message (the replies answer it)")
    replies = []
    for key, value in zip(keys, (chosen, rejected)):
        reply = as_messages(value, 'assistant', where, key)
        if reply[:len(prompt)] == prompt:  # a whole conversation that starts with the prompt
            reply = reply[len(prompt):]
        if not reply or any(m['role'] != 'assistant' for m in reply):
            raise PrepareError(f"{where}: {key!r} must be the assistant's reply (a string, or assistant messages "
                               f"after the prompt)")
        if not any(m['content'].strip() for m in reply):
            raise PrepareError(f"{where}: {key!r} is empty")
        replies.append(reply)
    task = record.get(TASK_KEY)
    if task is not None and (not isinstance(task, str) or not task.strip()):
        raise PrepareError(f"{where}: {TASK_KEY!r} must be a non-empty string (the kind of pair), got {task!r:.100}")
    return Pair(prompt, replies[0], replies[1], task)


def read_pairs_jsonl(path):
    """(where, Pair) for every non-blank line of a JSONL file."""
    for where, record in jsonl_records(path):
        yield where, pair_messages(record, where)


# -----------------------------------------------------------------------------
# encoding: a side of a pair -> (ids, mask, prompt length); truncation

def encode_side(prompt, reply, template, tokenizer):
    """-> (ids, mask, n): <bos> prompt reply, mask 1 on the reply's tokens (and its end marker) only, n the
    length of the prompt part (which includes the template's reply header, e.g. '<|im_start|>assistant\\n')."""
    ids, mask = chat_ids(prompt + reply, template, tokenizer)
    context, _ = chat_ids(prompt, template, tokenizer, add_generation_prompt=True)
    n = common_prefix(context, ids)
    mask = [0] * n + mask[n:]  # assistant turns inside the prompt are context here
    return ids, mask, n


def truncate_pair(sides, max_length):
    """Prompt first: cut the same number of oldest prompt tokens (after <bos>) from both sides until the
    longer side fits; then cut the end of a reply that still does not fit.
    -> (sides, prompt was cut, a reply was cut)."""
    longest = max(len(ids) for ids, _, _ in sides)
    if longest <= max_length:
        return sides, False, False
    cut = min(longest - max_length, min(n for _, _, n in sides) - 1)  # keep <bos>
    sides = [(ids[:1] + ids[1 + cut:], mask[:1] + mask[1 + cut:], n - cut) for ids, mask, n in sides]
    reply_cut = any(len(ids) > max_length for ids, _, _ in sides)
    sides = [(ids[:max_length], mask[:max_length], n) for ids, mask, n in sides]
    return sides, cut > 0, reply_cut


# -----------------------------------------------------------------------------
# the core: pairs -> shards + masks + meta.json

def prepare_pref(pairs, tokenizer, template, out_dir, max_length=1024, val_fraction=0.05, val_pairs=None,
                 seed=1337, shard_tokens=100_000_000, source='the input', extra_meta=None):
    """
    Tokenize preference pairs (an iterable of Pairs or (prompt, chosen, rejected) message lists, or of
    (where, that) pairs, which name the record in errors) into out_dir: train_*.bin + masks, val_*.bin +
    masks, the tokenizer file and meta.json (written last). Returns the meta dict.
    Split: one pair in round(1/val_fraction) goes to val, or, with val_pairs, those go to val.
    When pairs name their task, meta.json keeps the task of every pair written (read_pair_tasks reads it
    back) and the pairs per task; pairs without one count as UNTAGGED.
    """
    t0 = time.time()
    template = dict(get_template(template))
    tokenizer = with_template(tokenizer, template)
    check_settings(val_fraction, shard_tokens)
    if max_length < 8:
        raise PrepareError(f"--max_length {max_length} is too short for a prompt and a reply (at least 8)")
    items = labelled_splits(pairs, val_pairs, val_fraction, seed)
    first = next(items, None)  # peek: no pairs -> nothing touched on disk
    if first is None:
        raise PrepareError(f"no preference pairs in {source}: the input is empty")
    writers = open_split_writers(out_dir, tokenizer.vocab_size, shard_tokens, with_mask=True)
    counts = {split: {'tokens': 0, 'trained_tokens': 0, 'documents': 0, 'pairs': 0} for split in writers}
    stats = {'truncated_prompts': 0, 'truncated_replies': 0, 'skipped_identical': [], 'longest_pair_tokens': 0}
    tasks = {split: [] for split in writers}  # the task of each pair written (None: not named)
    try:
        for n, (split, pair) in enumerate(itertools.chain([first], items)):
            where, pair = pair if isinstance(pair[0], str) else (f"pair {n}", pair)
            prompt, chosen, rejected, task = Pair(*pair)
            if chosen == rejected:
                stats['skipped_identical'].append(where)
                continue
            try:
                sides = [encode_side(prompt, reply, template, tokenizer) for reply in (chosen, rejected)]
            except ValueError as e:  # chat.py's message about a role or a message
                raise PrepareError(f"{where}: {e}") from None
            stats['longest_pair_tokens'] = max(stats['longest_pair_tokens'], *(len(s[0]) for s in sides))
            sides, prompt_cut, reply_cut = truncate_pair(sides, max_length)
            stats['truncated_prompts'] += prompt_cut
            stats['truncated_replies'] += reply_cut
            if sides[0][0] == sides[1][0]:  # different messages, same tokens (e.g. only whitespace differed)
                stats['skipped_identical'].append(where)
                continue
            c = counts[split]
            for ids, mask, _ in sides:
                writers[split].write(np.asarray(ids), np.asarray(mask))
                c['tokens'] += len(ids)
                c['trained_tokens'] += sum(mask)
                c['documents'] += 1
            c['pairs'] += 1
            tasks[split].append(task)
        kept = counts['train']['pairs'] + counts['val']['pairs']
        if kept == 0 or (counts['train']['pairs'] == 0 and stats['skipped_identical']):
            raise PrepareError(f"{len(stats['skipped_identical'])} pair(s) of {source} have the same chosen and "
                               f"rejected reply (first: {stats['skipped_identical'][0]}), leaving {kept} to "
                               f"prefer: nothing to learn from; check the input's chosen and rejected fields")
        names = close_split_writers(writers, out_dir, counts,
                                    f"all {counts['val']['pairs']} pair(s) of {source} went to val, none to "
                                    f"train: give more pairs or a smaller --val_fraction")
        if counts['val']['pairs'] == 0:
            raise PrepareError(f"no pair of {source} went to val: give more pairs, a larger --val_fraction, or "
                               f"--val_input (dpo.py reports held-out reward accuracy)")
        skipped = stats.pop('skipped_identical')
        meta = {
            **tokenizer_fields(tokenizer, out_dir),
            'chat_template': template,
            'splits': {split: {**counts[split], 'shards': names[split]} for split in writers},
            'source': source,
            'val_fraction': val_fraction if val_pairs is None else None,
            'seed': seed,
            'shard_tokens': shard_tokens,
            'preference': {'format': 'pairs: each pair is two documents, chosen then rejected, each starting with '
                                     '<bos>; mask 1 = reply tokens', 'template': template.get('name', 'custom'),
                           'max_length': max_length, **stats, 'skipped_identical': len(skipped),
                           'skipped_identical_first': skipped[:10]},
            **(extra_meta or {}),
            **task_fields(tasks),
        }
        write_meta(out_dir, meta)
    except BaseException:
        abort_split_writers(writers, out_dir)
        raise
    for split, c in counts.items():
        print(f"{split}: {c['pairs']:,} pairs, {c['tokens']:,} tokens, {c['trained_tokens']:,} in replies, "
              f"{len(names[split])} shard(s)")
    if 'pair_tasks' in meta:
        per_task = meta['pair_tasks']['pairs']
        print("pairs per task (train/val): " + ', '.join(f"{name} {per_task['train'][name]:,}/{per_task['val'][name]:,}"
                                                         for name in meta['pair_tasks']['names']))
    print(f"truncated to --max_length {max_length}: {stats['truncated_prompts']} prompt(s), "
          f"{stats['truncated_replies']} reply(ies); the longest side had {stats['longest_pair_tokens']} tokens")
    if skipped:
        print(f"skipped {len(skipped)} pair(s) whose chosen and rejected replies are the same (first: "
              f"{', '.join(skipped[:3])})", file=sys.stderr)
    print(f"wrote {out_dir} ({template.get('name', 'custom')} template) in {time.time() - t0:.1f}s")
    return meta


def task_fields(tasks):
    """{split: [task or None per pair]} -> meta.json's 'pair_tasks' ({} when no pair names a task): the task
    names, the pairs per task of each split, and per split the task of each pair, in order, as one string of
    indices into the names ('0 2 1 ...': one line of meta.json, where a list would take a line a pair)."""
    if not any(t is not None for split in tasks.values() for t in split):
        return {}
    tasks = {split: [t or UNTAGGED for t in split_tasks] for split, split_tasks in tasks.items()}
    names = sorted({t for split_tasks in tasks.values() for t in split_tasks})
    index = {name: n for n, name in enumerate(names)}
    return {'pair_tasks': {
        'names': names,
        'pairs': {split: {name: split_tasks.count(name) for name in names} for split, split_tasks in tasks.items()},
        'per_pair': {split: ' '.join(str(index[t]) for t in split_tasks) for split, split_tasks in tasks.items()},
        'format': "per_pair: the task of each pair of a split, in order, as indices into names separated by spaces",
    }}


# -----------------------------------------------------------------------------
# reading a prepared set back (dpo.py)

def read_pairs(data_dir, split, meta):
    """-> [(chosen ids, chosen mask, rejected ids, rejected mask)] as numpy arrays, in order. ShardError
    when the split does not hold the pairs its meta.json promises."""
    if 'preference' not in meta:
        raise ShardError(f"{data_dir} holds no preference pairs (no 'preference' in meta.json): prepare them with "
                         f"python data/prepare_pref.py")
    docs = []
    for path in split_shards(data_dir, split, meta):
        tokens = np.asarray(read_shard(path, meta['vocab_size'], check_tokens=True))
        mask = np.asarray(read_mask(mask_path(path), len(tokens)))
        starts = np.flatnonzero(tokens == meta['bos_id']).tolist()
        if len(tokens) and (not starts or starts[0] != 0):
            raise ShardError(f"{path}: does not start with <bos>; not a preference data set")
        for a, b in zip(starts, starts[1:] + [len(tokens)]):
            docs.append((tokens[a:b].astype(np.int64), mask[a:b].astype(bool)))
    want = meta['splits'][split].get('pairs')
    if want is None or len(docs) != 2 * want:
        raise ShardError(f"{data_dir} '{split}': {len(docs)} documents, but meta.json says {want} pairs "
                         f"(two documents each); prepare the data again")
    pairs = [(*docs[i], *docs[i + 1]) for i in range(0, len(docs), 2)]
    empty = [i for i, p in enumerate(pairs) if not p[1][1:].any() or not p[3][1:].any()]
    if empty:
        raise ShardError(f"{data_dir} '{split}': pair {empty[0]} has a side with no reply token")
    return pairs


def read_pair_tasks(data_dir, split, meta):
    """-> (task names, a list of the task index of each pair of the split), or None for a data set whose pairs
    name no task (or one prepared before tasks were kept). ShardError when it does not match the pair count."""
    tasks = meta.get('pair_tasks')
    if tasks is None:
        return None
    try:
        names, ids = list(tasks['names']), [int(i) for i in tasks['per_pair'][split].split()]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ShardError(f"{data_dir}/meta.json: 'pair_tasks' is not what prepare_pref writes; prepare the data "
                         f"again") from None
    want = meta['splits'][split].get('pairs')
    if len(ids) != want or any(not 0 <= i < len(names) for i in ids):
        raise ShardError(f"{data_dir} '{split}': meta.json names the task of {len(ids)} pairs, not of its {want} "
                         f"pairs; prepare the data again")
    return names, ids
