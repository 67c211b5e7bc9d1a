"""
Sample from a trained model: continue a prompt, answer a whole prompts file, or chat.

    python sample.py --out_dir=out/biblia-pt --start="No princípio" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out/stories --start=FILE:prompts.txt --num_samples=3 --format=jsonl --output=stories.jsonl
    python sample.py --out_dir=out/chat --chat

The checkpoint carries everything needed: the model's shape, its weights and its tokenizer.
Prompts start with <bos>, like every training document; an empty prompt is just <bos>. A --start
prompt is encoded as written, special tokens included ('<|im_start|>' is the token), as serve.py's
/v1/completions does: a raw prompt is the whole token stream. In --chat, what you type is text only
(chat.chat_ids): the template's markers are the only special tokens of a chat.

A single prompt streams its samples to the terminal, one after another. A prompts file (one
prompt per line, blank lines skipped) is generated in batches on the KV cache: prompts of
similar length are batched together and left-padded, so a batch wastes little work on padding.
--output names a new file: one already there (an earlier run's samples) is replaced only with --overwrite.

What --seed fixes: each batch draws from its own torch.Generator seeded with seed + the batch's
number (batches run in order of prompt length; a single prompt's samples are batches of one).
The same checkpoint, prompts, settings, batch_size and device give the same samples. Rows of a
batch share their generator, so sampled text depends on batch_size; greedy text
(--temperature=0) does not: batched and one-at-a-time greedy outputs are identical.
"""
import json
import os
import sys
import time

from mirim.atomic import claim_file, write_atomic
from mirim.chat import get_template
from mirim.checkpoint import load_model
from mirim.common import dtype_name, resolve_device, resolve_dtype
from mirim.configurator import configure
from mirim.corpus import text_lines
from mirim.generate import check_sampling
from mirim.sampling import KNOBS, chat_loop, sample_prompts, stream_samples

# -----------------------------------------------------------------------------
# defaults; a config file or --key=value overrides them (configurator.py)
DEFAULTS = dict(
    out_dir='out',            # a training out_dir, a checkpoint file, or a Hugging Face Llama folder
    checkpoint='ckpt.pt',     # file inside out_dir: ckpt.pt (latest) or best.pt (best validation loss)
    start='',                 # the prompt; '' starts from <bos>; 'FILE:prompts.txt' reads one prompt per line
    num_samples=1,            # samples per prompt
    max_new_tokens=200,       # at most this many new tokens per sample; a sample ends earlier at <eos>
    temperature=KNOBS['temperature'],  # 0 = greedy (always the most likely token); < 1 sharper, > 1 wilder
    top_k=KNOBS['top_k'],     # sample only among the k most likely tokens; 0 = no limit
    top_p=KNOBS['top_p'],     # nucleus sampling: the fewest tokens holding this much probability; 1.0 = off
    repetition_penalty=KNOBS['repetition_penalty'],  # > 1 makes tokens already in the prompt or sample less likely (CTRL, HF)
    seed=1337,
    batch_size=16,            # prompts-file rows generated together
    format='text',            # 'text' (readable) or 'jsonl' (one JSON record per sample)
    output='',                # write the samples to this file instead of stdout
    overwrite=False,          # replace the --output file if it is already there (refused otherwise)
    chat=False,               # interactive chat with a model fine-tuned on a chat template
    chat_template='',         # override the checkpoint's chat template: 'chatml' or 'aira' (chat.py)
    system='',                # system message for --chat (templates that have a system role)
    device='auto',            # 'cpu', 'cuda', 'cuda:1', 'mps'; auto picks cuda, then mps, then cpu
    dtype='auto',             # 'float32', 'bfloat16', 'float16'; auto = bfloat16 on a GPU that has it (float16 on older ones), else float32
)


# -----------------------------------------------------------------------------
# prompts and output

def read_prompts(start):
    """--start -> list of prompts. 'FILE:path' gives one prompt per non-blank line."""
    if not start.startswith('FILE:'):
        return [start]
    path = start[len('FILE:'):]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path!r} not found (--start=FILE:path, one prompt per line)")
    prompts = [line for line in text_lines(path) if line.strip()]  # clean UTF-8, or one line naming the file
    if not prompts:
        raise ValueError(f"prompts file {path!r} has no prompts (one prompt per line)")
    return prompts


# -----------------------------------------------------------------------------
# output

def format_records(records, fmt):
    if fmt == 'jsonl':
        return ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records)
    return ''.join(f"--- prompt {r['prompt_index'] + 1}, sample {r['sample'] + 1} (seed {r['seed']}) ---\n"
                   f"{r['prompt']}{r['text']}\n" for r in records)


def main(argv):
    config = configure(DEFAULTS, argv, help_source=__file__)  # --help reads the comments in DEFAULTS
    if config['format'] not in ('text', 'jsonl'):
        raise ValueError(f"format={config['format']!r}: expected 'text' or 'jsonl'")
    knobs = {k: config[k] for k in ('temperature', 'top_k', 'top_p', 'repetition_penalty')}
    check_sampling(**knobs)
    if config['max_new_tokens'] < 1 or config['num_samples'] < 1 or config['batch_size'] < 1:
        raise ValueError("max_new_tokens, num_samples and batch_size must be at least 1")
    if config['output'] and not config['chat']:  # refused before the model loads, not after the work
        claim_file(config['output'], config['overwrite'], '--output')
    device = resolve_device(config['device'])
    dtype = resolve_dtype(config['dtype'], device)
    model, tokenizer, _ = load_model(config['out_dir'], device, dtype, checkpoint=config['checkpoint'])
    t0 = time.perf_counter()

    if config['chat']:
        template = config['chat_template'] or tokenizer.chat_template
        if not template:
            raise ValueError("this checkpoint's tokenizer has no chat template (it was not fine-tuned for chat); "
                             "pass one with --chat_template=chatml or --chat_template=aira")
        if sys.stdin.isatty():
            print(f"chatting with {config['out_dir']} ({get_template(template).get('name', 'custom')} template). "
                  f"/reset forgets the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
        generated, elapsed = chat_loop(model, tokenizer, template, config['system'], config['max_new_tokens'],
                                       config['seed'], **knobs)  # time spent answering, not waiting for you
    else:
        prompts = read_prompts(config['start'])
        single = not config['start'].startswith('FILE:')
        if single and config['format'] == 'text' and not config['output']:
            generated = stream_samples(model, tokenizer, prompts[0], config['num_samples'],
                                       config['max_new_tokens'], config['seed'], **knobs)
        else:
            records = sample_prompts(model, tokenizer, prompts, config['num_samples'], config['max_new_tokens'],
                                     config['temperature'], config['top_k'], config['top_p'],
                                     config['repetition_penalty'], config['seed'], config['batch_size'])
            generated = sum(len(r['tokens']) for r in records)
            text = format_records(records, config['format'])
            if config['output']:
                write_atomic(config['output'], text.encode('utf-8'))  # an interrupted run leaves no half file
                print(f"wrote {len(records)} samples to {config['output']}", file=sys.stderr)
            else:
                sys.stdout.write(text)
                sys.stdout.flush()
        elapsed = time.perf_counter() - t0
    print(f"{generated} tokens in {elapsed:.2f}s: {generated / max(elapsed, 1e-9):.1f} tokens/s "
          f"({device}, {dtype_name(dtype)})", file=sys.stderr)


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (OSError, ValueError) as e:  # CheckpointError and ConfigError are ValueErrors
        sys.exit(f"sample.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
