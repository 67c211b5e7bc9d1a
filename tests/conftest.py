"""Helpers shared by several test files (pytest puts this folder on sys.path: `from conftest import ...`)."""
import pytest
import torch


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
    from tokenizer import train_sentencepiece
    return {kind: train_sentencepiece(iter(lines), str(tmp_path_factory.mktemp(kind) / 'tokenizer.model'),
                                      vocab_size=vocab_size, model_type=kind) for kind in ('bpe', 'unigram')}
