"""
Decoding on the KV cache, in the order it runs (as gpt-fast's generate.py): pick the next token
from logits, prefill the prompt, decode one token, the loop that slides the context window when
it fills up, generate() for a batch, and the CPU batch-1 weight layout. Token ids in, token ids
out: text is sample.py's business.

    from generate import generate
    out = generate(model, idx, max_new_tokens=50, temperature=0)   # (B, T + 50), greedy

The sampling settings mean the same in every function and on every command line:
temperature 0 = greedy, top_k 0 = no limit, top_p 1.0 = off, repetition_penalty 1.0 = off.
"""
import math
import weakref
from contextlib import contextmanager

import torch
import torch.nn as nn

from model import RMSNorm


def check_sampling(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0):
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or repetition_penalty <= 0:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0; got "
                         f"{temperature}, {top_k}, {top_p}, {repetition_penalty}")


def sample_next(logits, seen, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, generator=None,
                left_pad=None):
    """Pick one token per row from logits (B, vocab).
    repetition_penalty > 1 makes every token already in `seen` (B, T) less likely, as in CTRL
    (Keskar et al. 2019) and HF: its logit is divided by the penalty when positive, multiplied when
    negative. top_k keeps the k most likely tokens; top_p keeps the smallest set whose probability
    reaches p. left_pad (B,) marks the pad tokens at the start of each row of seen."""
    if repetition_penalty != 1.0:
        valid = torch.ones_like(seen, dtype=logits.dtype)
        if left_pad is not None:  # pad tokens are not part of the text
            valid = (torch.arange(seen.size(1), device=seen.device)[None] >= left_pad[:, None]).to(logits.dtype)
        present = torch.zeros_like(logits).scatter_add_(1, seen, valid) > 0
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(present, penalized, logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the most likely always stays)
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        logits = logits.masked_fill(torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted), float('-inf'))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample_rows(logits, seen, temperature, top_k, top_p, repetition_penalty, uniform, left_pad=None):
    """sample_next with each row's own settings: temperature, top_k, top_p, repetition_penalty are (B,)
    tensors (0 / 0 / 1.0 / 1.0 = off, temperature 0 = greedy), so rows that sample differently share one
    step (serve.py's batches). uniform (B,) holds one draw in [0, 1) per row, which picks the row's token
    by inverse CDF: a row drawn from its own torch.Generator gets the same token whichever rows it is
    batched with. Top-k keeps each row's k highest logits (ties at the k-th are cut by position)."""
    B, V = logits.shape
    if bool((repetition_penalty != 1).any()):
        valid = torch.ones_like(seen, dtype=logits.dtype)
        if left_pad is not None:
            valid = (torch.arange(seen.size(1), device=seen.device)[None] >= left_pad[:, None]).to(logits.dtype)
        present = torch.zeros_like(logits).scatter_add_(1, seen, valid) > 0
        penalty = repetition_penalty[:, None].to(logits.dtype)
        logits = torch.where(present, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    greedy = logits.argmax(dim=-1)
    sampled = temperature > 0
    if not bool(sampled.any()):
        return greedy
    logits = logits / torch.where(sampled, temperature, 1.0)[:, None].to(logits.dtype)
    order = None
    if bool(((top_k > 0) & (top_k < V)).any() or (top_p < 1).any()):
        logits, order = torch.sort(logits, dim=-1, descending=True)
        keep = torch.where(top_k > 0, top_k, V)
        logits = logits.masked_fill(torch.arange(V, device=logits.device)[None] >= keep[:, None], float('-inf'))
    probs = logits.softmax(dim=-1)
    if order is not None:  # drop a token when the tokens before it already reach top_p (the first stays)
        probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= top_p[:, None].to(probs.dtype), 0.0)
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, uniform[:, None].to(cdf.dtype) * cdf[:, -1:], right=True).clamp(max=V - 1)
    token = index.squeeze(1) if order is None else order.gather(1, index).squeeze(1)
    fine = torch.isfinite(cdf[:, -1]) & (cdf[:, -1] > 0)  # a row with no finite probabilities falls back to greedy
    return torch.where(sampled & fine, token, greedy)


def prefill(model, idx, left_pad=None):
    """Run the prompt (B, T) into a fresh cache from position 0 -> logits of its last position."""
    return model.forward_cached(idx, 0, left_pad)


def decode_one_token(model, token, pos, left_pad=None):
    """Run one new token per row (B,) at cache position pos -> logits for the next one."""
    return model.forward_cached(token[:, None], pos, left_pad)


# inference mode, not just no_grad: it skips autograd's bookkeeping on every op, which matters on
# the CPU, where a batch-1 decoding step is many tiny ops
@torch.inference_mode()
def decode_tokens(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                  eos_id=None, generator=None, left_pad=None):
    """Yield the next token of every row, (B,), one step at a time. Rows that produced eos_id keep
    yielding eos_id; stops when all rows are done. When the cache is full, the most recent half of
    the context is prefilled again and decoding goes on from there."""
    B, T = idx.shape
    block = model.config.block_size
    length = min(block, T + max_new_tokens)
    model.setup_cache(B, length, device=idx.device)
    seen = idx.clone()
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    logits, pos = prefill(model, idx, left_pad), T
    for step in range(max_new_tokens):
        next_token = sample_next(logits.float(), seen, temperature, top_k, top_p, repetition_penalty,
                                 generator, left_pad)
        if eos_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos_id), next_token)
            finished |= next_token == eos_id
        yield next_token
        seen = torch.cat([seen, next_token[:, None]], dim=1)
        if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
            break
        if pos == length:
            keep = block // 2
            if left_pad is not None:
                left_pad = (left_pad - (seen.size(1) - keep)).clamp(min=0)
            # the cache is overwritten from position 0; nothing past pos is ever read
            logits, pos = prefill(model, seen[:, -keep:], left_pad), keep
        else:
            logits, pos = decode_one_token(model, next_token, pos, left_pad), pos + 1
    model.release_cache()


def generate_tokens(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                    eos_id=None, generator=None, left_pad=None):
    """decode_tokens for a prompt idx (B, T), in the CPU batch-1 weight layout where it pays
    (sample.py streams these). generator (a torch.Generator on idx's device) makes sampling
    repeatable; left_pad (B,) says how many pad tokens each left-padded row starts with."""
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    B, T = idx.shape
    if T + 1 > model.config.block_size:
        raise ValueError(f"prompt of {T} tokens leaves no room in the context of {model.config.block_size}; "
                         f"crop it first")
    # the layout is switched outside inference mode: the weights must stay usable for training
    vector = B == 1 and idx.device.type == 'cpu' and model.output.weight.dtype == torch.float32
    with vector_layout(model, vector):
        yield from decode_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                 eos_id, generator, left_pad)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
             eos_id=None, generator=None, left_pad=None):
    """Continue each row of idx (B, T) -> (B, T + new tokens); with eos_id, rows that finished
    early are filled with eos_id."""
    new = list(generate_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                               eos_id, generator, left_pad))
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


# -----------------------------------------------------------------------------
# batch-1 decoding on the CPU: a vector times each weight matrix. MKL's matrix-vector product is
# faster when a widening matrix (out > in features) is stored transposed, and slower for narrowing
# ones; with 4+ rows, or bf16 weights, the usual layout is as fast or faster (README: speed notes).

_transposed = weakref.WeakKeyDictionary()  # Linear -> (its weight, the weight's version, transposed copy)


def vector_rms_norm(x, scaled_weight, eps_term):
    # RMSNorm in 4 ops (F.rms_norm is a composite of ~8 on the CPU, and each op costs microseconds
    # at batch 1): x * w / sqrt(mean(x^2) + eps) = x * (w * sqrt(d)) / hypot(|x|, sqrt(d * eps))
    return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), eps_term) * scaled_weight


@contextmanager
def vector_layout(model, enabled=True):
    """While enabled, the widening Linear weights are swapped for transposed copies (same shapes and
    values, only the memory order differs) and the RMSNorms use vector_rms_norm; both are put back
    afterwards. The copies are kept for the next generation until the weights change (an optimizer
    step or load_state_dict moves their version counter), at the price of a second copy of those
    matrices while the model is used for sampling."""
    swapped, norms = {}, []
    if not enabled:
        for m in model.modules():  # not decoding vectors now: free the copies
            _transposed.pop(m, None)
        yield
        return
    try:
        for m in model.modules():
            if isinstance(m, RMSNorm):
                dim = m.weight.numel()
                terms = (m.weight.detach() * math.sqrt(dim), torch.tensor(math.sqrt(dim * m.eps), dtype=m.weight.dtype))
                m.forward = lambda x, terms=terms: vector_rms_norm(x, *terms)
                norms.append(m)
            if isinstance(m, nn.Linear) and m.out_features > m.in_features:
                weight = m.weight.data
                cached = _transposed.get(m)
                # the entry holds the weight it copied, so no other tensor can reuse its memory
                if cached is None or not cached[0].is_set_to(weight) or cached[1] != m.weight._version:
                    cached = _transposed[m] = (weight, m.weight._version, weight.t().contiguous().t())
                swapped[m] = weight
                m.weight.data = cached[2]
        yield
    finally:
        for m, weight in swapped.items():
            m.weight.data = weight
        for m in norms:
            del m.forward  # back to the class's forward
