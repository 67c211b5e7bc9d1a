"""
How big a training run should be: tokens per parameter (Chinchilla's 20), capped by epochs of the
corpus, and the batch that leaves about a thousand steps. train.py's depth dial (model='auto') sizes
its run with size_run; plan.py prints the same numbers before a run.
"""
import math


CHINCHILLA_TOKENS_PER_PARAM = 20


def human(x, unit=''):
    """1234567 -> '1.23M'"""
    for value, suffix in ((1e12, 'T'), (1e9, 'B'), (1e6, 'M'), (1e3, 'k')):
        if abs(x) >= value:
            return f"{x / value:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


MAX_BATCH_TOKENS = 2 ** 19  # nanochat's and cucafera's batch: 524,288 tokens a step


MIN_STEPS = 1000            # the dial's batch leaves at least ~this many steps


def size_run(params, block_size, tokens_per_param=CHINCHILLA_TOKENS_PER_PARAM, corpus_tokens=None, max_epochs=4.0):
    """The depth dial's run size for a model of `params` parameters: {'tokens', 'batch_tokens',
    'max_iters', 'why'}. Tokens: tokens_per_param x params, but at most max_epochs over the corpus
    (repeating data beyond ~4 epochs buys little; Muennighoff et al. 2023). Tokens per step: the
    power of two that leaves about MIN_STEPS steps (a small run wants many small steps, a big one
    big batches), at least one sequence and at most MAX_BATCH_TOKENS."""
    tokens = tokens_per_param * params
    why = f"{tokens_per_param:g} tokens/param"
    if corpus_tokens and tokens > max_epochs * corpus_tokens:
        tokens = max_epochs * corpus_tokens
        why = f"{max_epochs:g} epochs of the corpus ({tokens_per_param:g} tokens/param: {human(tokens_per_param * params)})"
    batch_tokens = 2 ** max(0, round(math.log2(max(1.0, tokens / MIN_STEPS))))
    batch_tokens = min(MAX_BATCH_TOKENS, max(block_size, batch_tokens))
    return {'tokens': tokens, 'batch_tokens': batch_tokens, 'max_iters': max(1, math.ceil(tokens / batch_tokens)),
            'why': why}
