"""Helpers shared by several test files (pytest puts this folder on sys.path: `from conftest import ...`)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from model import Llama, LlamaConfig  # noqa: E402


def tiny_config(tokenizer=None, **overrides):
    """A 2-layer, 32-wide LlamaConfig (GQA: 4 heads, 2 kv); with a tokenizer, its vocab and special ids."""
    shape = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48,
                 activation='silu', bos_id=1, eos_id=2, pad_id=3)
    if tokenizer is not None:
        shape.update(vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                     pad_id=tokenizer.pad_id)
    return LlamaConfig(**{**shape, **overrides})


def tiny_model(seed=0, tokenizer=None, **overrides):
    """A tiny_config model with seeded weights, in eval mode."""
    return Llama(tiny_config(tokenizer, **overrides), seed=seed).eval()


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models run fastest on one thread (torchrun gives each process one too); two threads
    fighting over small matmuls on a busy 2-core machine can be 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def word_rotations(texts, rounds=60):
    """A few KB of training lines: each text `rounds` times, its words rotated a step each time."""
    lines = []
    for n in range(rounds):
        for text in texts:
            words = text.split(' ')
            lines.append(' '.join(words[n % len(words):] + words[:n % len(words)]))
    return lines


def tiny_sentencepieces(lines, tmp_path_factory, vocab_size=400):
    """{'bpe': tokenizer, 'unigram': tokenizer}, each trained on lines."""
    from mirim.tokenizer import train_sentencepiece
    return {kind: train_sentencepiece(iter(lines), str(tmp_path_factory.mktemp(kind) / 'tokenizer.model'),
                                      vocab_size=vocab_size, model_type=kind) for kind in ('bpe', 'unigram')}
