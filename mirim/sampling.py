"""
Text from a model and a tokenizer: prompts encoded and cut to fit the context, batched sampling of
many prompts on the KV cache, one sample streamed as it is made, and a chat loop. sample.py is the
command; serve.py and data/biblia/exact_match.py use these too. generate.py below it knows only ids.
"""
import sys
import time

import torch
from tqdm import tqdm

from mirim.chat import chat_ids, get_template, stop_id
from mirim.generate import check_sampling, generate_tokens

# the sampling settings sample.py starts from; an ollama Modelfile (gguf_export.py) carries the same
KNOBS = dict(temperature=0.8, top_k=200, top_p=1.0, repetition_penalty=1.0)


def prompt_budget(block_size, max_new_tokens):
    """The most prompt tokens kept: room for the whole sample when it fits in half the context, else
    half the context (longer samples slide the window: generate.decode_tokens re-reads its last half)."""
    return block_size - min(max_new_tokens, block_size // 2)


def encode_prompt(tokenizer, text, budget):
    """-> (ids, was_cut). <bos> + text, cut from the left to at most budget tokens."""
    ids = tokenizer.encode(text, bos=True)
    return (ids[-budget:], True) if len(ids) > budget else (ids, False)


def continuation_text(tokenizer, context_ids, new_ids):
    """The text new_ids add after context_ids. Decoding new_ids alone can differ: SentencePiece drops
    the leading space of a sequence's first piece. A few context tokens keep the join exact."""
    anchor = list(context_ids[-4:])
    return tokenizer.decode(anchor + list(new_ids))[len(tokenizer.decode(anchor)):]


def decode_stream(tokenizer, context_ids, tokens):
    """Yield the text of tokens (an iterable of ids) piece by piece as they arrive. A character
    split over several tokens (UTF-8 bytes, byte fallback) decodes as U+FFFD until it is complete,
    so text ending in U+FFFD waits for the next token rather than printing a replacement mark."""
    anchor, pending = list(context_ids[-4:]), []
    for token in tokens:
        pending.append(int(token))
        piece = continuation_text(tokenizer, anchor, pending)
        if not piece.endswith('\ufffd'):
            yield piece
            anchor, pending = (anchor + pending)[-4:], []
    if pending:  # whatever is left, even if it never became valid UTF-8
        yield continuation_text(tokenizer, anchor, pending)


def make_generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def generate_batch(model, prompts, max_new_tokens, pad_id, eos_id, generator=None, **knobs):
    """Prompts of token ids decoded together on the KV cache, left-padded (the padding masked) -> each row's
    max_new_tokens new ids (a row that ended keeps giving eos_id; the batch stops when all have)."""
    device = model.output.weight.device
    lengths = [len(ids) for ids in prompts]
    width = max(lengths)
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for r, ids in enumerate(prompts):
        idx[r, width - lengths[r]:] = torch.tensor(ids)
    left_pad = torch.tensor([width - n for n in lengths], device=device) if min(lengths) < width else None
    steps = generate_tokens(model, idx.to(device), max_new_tokens, eos_id=eos_id, generator=generator,
                            left_pad=left_pad, **knobs)
    return torch.stack(list(steps), dim=1).tolist()


def sample_prompts(model, tokenizer, prompts, num_samples=1, max_new_tokens=200, temperature=0.8, top_k=200,
                   top_p=1.0, repetition_penalty=1.0, seed=1337, batch_size=16, progress=True):
    """Generate num_samples continuations of every prompt, batch_size rows at a time on the KV cache.
    Returns one record per sample in prompt order: prompt_index, sample, seed (of its batch's
    generator), prompt, text (the continuation), tokens (its ids, without <eos>), finish_reason
    ('eos' or 'length'). bench.py times this with batch_size=1 against the batched run."""
    if max_new_tokens < 1 or num_samples < 1 or batch_size < 1:
        raise ValueError("max_new_tokens, num_samples and batch_size must be at least 1")
    knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    check_sampling(**knobs)
    device = model.output.weight.device
    budget = prompt_budget(model.config.block_size, max_new_tokens)
    encoded = [encode_prompt(tokenizer, p, budget) for p in prompts]
    cut = sum(was_cut for _, was_cut in encoded)
    if cut:
        warn(f"{cut} prompt(s) longer than {budget} tokens were cut from the left (block_size "
             f"{model.config.block_size}, max_new_tokens {max_new_tokens})")
    # rows sorted by prompt length (stable), so each batch holds prompts of similar length
    rows = sorted(((i, j) for i in range(len(prompts)) for j in range(num_samples)),
                  key=lambda row: len(encoded[row[0]][0]))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    records = {}
    # a bar only on a terminal: in a log file every redraw would be a line
    with tqdm(total=len(rows), unit='sample', disable=not (progress and sys.stderr.isatty()), file=sys.stderr) as bar:
        for batch_number, start in enumerate(range(0, len(rows), batch_size)):
            batch = rows[start:start + batch_size]
            batch_seed = seed + batch_number
            new = generate_batch(model, [encoded[i][0] for i, _ in batch], max_new_tokens, pad_id, tokenizer.eos_id,
                                 generator=make_generator(device, batch_seed), **knobs)
            for r, (i, j) in enumerate(batch):
                tokens = new[r]
                finish = 'eos' if tokenizer.eos_id in tokens else 'length'
                tokens = tokens[:tokens.index(tokenizer.eos_id)] if finish == 'eos' else tokens
                records[i, j] = dict(prompt_index=i, sample=j, seed=batch_seed, prompt=prompts[i],
                                     text=continuation_text(tokenizer, encoded[i][0], tokens), tokens=tokens,
                                     finish_reason=finish)
            bar.update(len(batch))
    return [records[i, j] for i in range(len(prompts)) for j in range(num_samples)]


def stream_sample(model, tokenizer, prompt_ids, max_new_tokens, generator, write, stop_ids=(), **knobs):
    """Generate one sample (batch of one), writing its text as it is made. Returns its token ids,
    without the stop token that ended it (the tokenizer's eos, or any of stop_ids)."""
    stops = {tokenizer.eos_id, *stop_ids}
    device = model.output.weight.device
    tokens = []

    def until_stop():
        steps = generate_tokens(model, torch.tensor([prompt_ids], device=device), max_new_tokens,
                                eos_id=tokenizer.eos_id, generator=generator, **knobs)
        for step in steps:
            token = int(step[0])
            if token in stops:
                break
            tokens.append(token)
            yield token
        steps.close()
        model.release_cache()

    for piece in decode_stream(tokenizer, prompt_ids, until_stop()):
        write(piece)
    return tokens


def stream_samples(model, tokenizer, prompt, num_samples, max_new_tokens, seed, **knobs):
    """One prompt to the terminal: print it, then each sample as it is made (sample k uses seed + k,
    as a batch of one does in sample_prompts). Returns the number of tokens generated."""
    budget = prompt_budget(model.config.block_size, max_new_tokens)
    ids, was_cut = encode_prompt(tokenizer, prompt, budget)
    if was_cut:
        warn(f"the prompt is longer than {budget} tokens: keeping its last {budget}")
        prompt = tokenizer.decode(ids)
    generated = 0
    for k in range(num_samples):
        print(('\n---------------\n' if k else '') + prompt, end='', flush=True)
        generator = make_generator(model.output.weight.device, seed + k)
        generated += len(stream_sample(model, tokenizer, ids, max_new_tokens, generator,
                                       lambda piece: print(piece, end='', flush=True), **knobs))
    print()
    return generated


def fit_history(messages, template, tokenizer, budget):
    """-> (messages kept, prompt ids): the oldest exchanges (a user message and its reply) are
    dropped until the conversation fits in budget tokens; a system message always stays."""
    system = messages[:1] if messages and messages[0]['role'] == 'system' else []
    turns = messages[len(system):]
    while True:
        ids, _ = chat_ids(system + turns, template, tokenizer, add_generation_prompt=True)
        if len(ids) <= budget or len(turns) <= 1:
            break
        turns = turns[2:]
    if len(ids) > budget:
        warn(f"the message needs {len(ids)} tokens; keeping its last {budget} (the context is "
             f"{budget} tokens plus room for the reply)")
        ids = ids[-budget:]
    return system + turns, ids


def chat_loop(model, tokenizer, template, system='', max_new_tokens=200, seed=1337, read=input, write=None,
              flush=None, **knobs):
    """Read a user message per line (read), stream the reply (write, flush: stdout's by default).
    /reset forgets the conversation, /exit (or end of input) quits.
    Returns (tokens generated, seconds spent generating them)."""
    write, flush = write or sys.stdout.write, flush or sys.stdout.flush
    template = get_template(template)
    stop = stop_id(template, tokenizer)
    if system and template.get('system') is None:
        raise ValueError(f"chat template {template.get('name')!r} has no system role: drop --system")
    device = model.output.weight.device
    generator = make_generator(device, seed)
    budget = prompt_budget(model.config.block_size, max_new_tokens)
    start = [{'role': 'system', 'content': system}] if system else []
    messages, generated, seconds = list(start), 0, 0.0
    while True:
        try:
            line = read('> ' if sys.stdin.isatty() else '')
        except EOFError:
            break
        line = line.strip()
        if line in ('/exit', '/quit'):
            break
        if line == '/reset':
            messages = list(start)
            continue
        if not line:
            continue
        kept, ids = fit_history(messages + [{'role': 'user', 'content': line}], template, tokenizer, budget)
        dropped = len(messages) + 1 - len(kept)
        if dropped:
            warn(f"the conversation outgrew the context: forgot its {dropped} oldest message(s)")
        t0 = time.perf_counter()
        reply = stream_sample(model, tokenizer, ids, max_new_tokens, generator, write, stop_ids=(stop,), **knobs)
        write('\n')
        flush()
        generated, seconds = generated + len(reply), seconds + time.perf_counter() - t0
        messages = kept + [{'role': 'assistant', 'content': continuation_text(tokenizer, ids, reply)}]
    return generated, seconds
