import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mirim import shards
from mirim.shards import BatchSampler, iter_sequential, read_shard, ShardError, ShardWriter, write_shard


def make_data_dir(root, splits, vocab_size=1000, masks=None):
    """splits: {'train': [token arrays], ...}; masks: {'train': [mask arrays], ...} or None."""
    meta = {'vocab_size': vocab_size, 'splits': {}}
    for split, arrays in splits.items():
        names = []
        for i, tokens in enumerate(arrays):
            name = f"{split}_{i:06d}.bin"
            write_shard(os.path.join(root, name), tokens, vocab_size)
            if masks and split in masks:
                shards.write_mask(shards.mask_path(os.path.join(root, name)), masks[split][i])
            names.append(name)
        meta['splits'][split] = {'tokens': sum(len(a) for a in arrays), 'shards': names}
    shards.write_meta(root, meta)
    return str(root)


def header_ints(path):
    return np.fromfile(path, dtype='<i4', count=shards.HEADER_INTS)


def patch_header(path, index, value):
    header = header_ints(path)
    header[index] = value
    with open(path, 'r+b') as f:
        f.write(header.tobytes())


# --- format ---

def test_shard_round_trip_keeps_tokens(tmp_path):
    tokens = np.array([1, 5, 999, 0, 42])
    write_shard(tmp_path / 'a.bin', tokens, vocab_size=1000)
    assert read_shard(tmp_path / 'a.bin', vocab_size=1000).tolist() == tokens.tolist()


def test_header_fields_and_file_size(tmp_path):
    write_shard(tmp_path / 'a.bin', [1, 2, 3], vocab_size=1000)
    assert header_ints(tmp_path / 'a.bin')[:6].tolist() == [shards.MAGIC, shards.VERSION, 2, 3, 1000, 0]
    assert os.path.getsize(tmp_path / 'a.bin') == 1024 + 3 * 2


def test_vocab_65536_is_uint16(tmp_path):
    write_shard(tmp_path / 'a.bin', [0, 65535], vocab_size=65536)
    tokens = read_shard(tmp_path / 'a.bin')
    assert tokens.dtype == np.uint16 and tokens.tolist() == [0, 65535]


def test_vocab_65537_is_uint32(tmp_path):
    write_shard(tmp_path / 'a.bin', [0, 65536], vocab_size=65537)
    tokens = read_shard(tmp_path / 'a.bin')
    assert tokens.dtype == np.uint32 and tokens.tolist() == [0, 65536]
    assert header_ints(tmp_path / 'a.bin')[2] == 4


def test_write_refuses_token_outside_vocab(tmp_path):
    with pytest.raises(ValueError, match='must lie in'):
        write_shard(tmp_path / 'a.bin', [3, 10], vocab_size=10)
    assert not os.path.exists(tmp_path / 'a.bin')


def test_bad_magic_is_refused(tmp_path):
    write_shard(tmp_path / 'a.bin', [1, 2], vocab_size=10)
    patch_header(tmp_path / 'a.bin', 0, 12345)
    with pytest.raises(ShardError, match=r'a\.bin: not a mirim shard: magic number 12345'):
        read_shard(tmp_path / 'a.bin')


def test_unknown_version_is_refused(tmp_path):
    write_shard(tmp_path / 'a.bin', [1, 2], vocab_size=10)
    patch_header(tmp_path / 'a.bin', 1, 7)
    with pytest.raises(ShardError, match='format version 7'):
        read_shard(tmp_path / 'a.bin')


def test_bytes_per_token_inconsistent_with_vocab_is_refused(tmp_path):
    write_shard(tmp_path / 'a.bin', [1, 2], vocab_size=10)
    patch_header(tmp_path / 'a.bin', 2, 4)
    with pytest.raises(ShardError, match='4 bytes per token does not match vocab_size 10'):
        read_shard(tmp_path / 'a.bin')


def test_truncated_shard_is_refused(tmp_path):
    write_shard(tmp_path / 'a.bin', list(range(100)), vocab_size=1000)
    os.truncate(tmp_path / 'a.bin', 1024 + 150)
    with pytest.raises(ShardError, match='truncated: header promises 100 tokens'):
        read_shard(tmp_path / 'a.bin')


def test_file_shorter_than_header_is_refused(tmp_path):
    (tmp_path / 'a.bin').write_bytes(b'\0' * 100)
    with pytest.raises(ShardError, match='less than the 1024-byte header'):
        read_shard(tmp_path / 'a.bin')


def test_trailing_bytes_are_refused(tmp_path):
    write_shard(tmp_path / 'a.bin', [1, 2], vocab_size=10)
    with open(tmp_path / 'a.bin', 'ab') as f:
        f.write(b'xx')
    with pytest.raises(ShardError, match='2 bytes more than'):
        read_shard(tmp_path / 'a.bin')


def test_vocab_mismatch_is_refused(tmp_path):
    write_shard(tmp_path / 'a.bin', [1, 2], vocab_size=300)
    with pytest.raises(ShardError, match='written with vocab_size 300, expected 512'):
        read_shard(tmp_path / 'a.bin', vocab_size=512)


def test_check_tokens_finds_id_at_or_above_vocab(tmp_path):
    write_shard(tmp_path / 'a.bin', [1, 2, 3], vocab_size=10)
    with open(tmp_path / 'a.bin', 'r+b') as f:  # corrupt the third token
        f.seek(1024 + 2 * 2)
        f.write(np.array([10], dtype='<u2').tobytes())
    read_shard(tmp_path / 'a.bin')  # the header alone is fine
    with pytest.raises(ShardError, match='token id 10 at position 2 is >= vocab_size 10'):
        read_shard(tmp_path / 'a.bin', check_tokens=True)


def test_mask_shard_round_trip(tmp_path):
    shards.write_mask(tmp_path / 'a.mask.bin', [0, 1, 1])
    mask = shards.read_mask(tmp_path / 'a.mask.bin', num_tokens=3)
    assert mask.dtype == np.uint8 and mask.tolist() == [0, 1, 1]


def test_mask_length_must_match_tokens(tmp_path):
    shards.write_mask(tmp_path / 'a.mask.bin', [0, 1, 1])
    with pytest.raises(ShardError, match='mask has 3 entries, its token shard has 4'):
        shards.read_mask(tmp_path / 'a.mask.bin', num_tokens=4)


def test_empty_shard_reads_as_empty_array(tmp_path):
    write_shard(tmp_path / 'a.bin', [], vocab_size=10)
    assert len(read_shard(tmp_path / 'a.bin')) == 0


# --- streaming writer ---

def test_shard_writer_rolls_every_shard_tokens(tmp_path):
    with ShardWriter(tmp_path, 'train', vocab_size=100, shard_tokens=10) as writer:
        writer.write(np.arange(7))
        writer.write(np.arange(7, 25))
    assert writer.shards == ['train_000000.bin', 'train_000001.bin', 'train_000002.bin']
    lengths = [len(read_shard(tmp_path / n, 100)) for n in writer.shards]
    assert lengths == [10, 10, 5]
    joined = np.concatenate([read_shard(tmp_path / n) for n in writer.shards])
    assert joined.tolist() == list(range(25))


def test_shard_writer_leaves_no_shard_when_interrupted(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, 'train', vocab_size=100, shard_tokens=10) as writer:
            writer.write(np.arange(15))
            raise RuntimeError("crash")
    assert sorted(os.listdir(tmp_path)) == ['train_000000.bin']  # the finished one; the half one is gone


def test_ctrl_c_right_after_a_shard_is_renamed_still_reads_as_ctrl_c(tmp_path, monkeypatch):
    replace = os.replace

    def interrupted(src, dst):  # the rename happened, `self.files = None` did not
        replace(src, dst)
        raise KeyboardInterrupt
    monkeypatch.setattr(shards.os, 'replace', interrupted)
    with pytest.raises(KeyboardInterrupt):  # not a FileNotFoundError from abort() for the renamed .tmp
        with ShardWriter(tmp_path, 'train', vocab_size=100, shard_tokens=10) as writer:
            writer.write(np.arange(10))


def test_unfinished_tmp_shard_does_not_read_as_a_shard(tmp_path):
    writer = ShardWriter(tmp_path, 'train', vocab_size=100, shard_tokens=10)
    writer.write(np.arange(5))
    writer.files[0].flush()  # as if the process died here
    with pytest.raises(ShardError, match='magic number 0'):
        read_shard(tmp_path / 'train_000000.bin.tmp')
    assert not os.path.exists(tmp_path / 'train_000000.bin')
    writer.abort()


def test_shard_writer_writes_masks_beside_shards(tmp_path):
    with ShardWriter(tmp_path, 'train', vocab_size=100, shard_tokens=4, with_mask=True) as writer:
        writer.write(np.arange(6), mask=[0, 0, 1, 1, 1, 0])
    assert shards.read_mask(tmp_path / 'train_000001.mask.bin').tolist() == [1, 0]


# --- data folder errors ---

def test_missing_data_dir_names_prepare_commands(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        shards.load_meta(str(tmp_path / 'nope'))
    assert 'python data/prepare.py' in str(info.value) and 'python data/biblia/prepare.py --lang pt' in str(info.value)


def test_split_without_shards_is_a_clear_error(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(100)]})
    with pytest.raises(ShardError, match="has no 'val' shards"):
        BatchSampler(data_dir, 'val', batch_size=2, block_size=8)


def test_block_size_longer_than_every_shard_is_a_clear_error(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(50), np.arange(60)]})
    with pytest.raises(ShardError, match='block_size 64 needs windows of 65 tokens, but the longest'):
        BatchSampler(data_dir, 'train', batch_size=2, block_size=64)


def test_shard_shorter_than_a_window_is_skipped_with_a_warning(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(100), np.full(5, 999)]})
    with pytest.warns(UserWarning, match='train_000001.bin'):
        sampler = BatchSampler(data_dir, 'train', batch_size=16, block_size=8)
    x, _ = sampler.next_batch()
    assert (x != 999).all()


def test_sampler_refuses_vocab_other_than_meta(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(100)]}, vocab_size=1000)
    with pytest.raises(ShardError, match='vocab_size 1000, but 512 expected'):
        BatchSampler(data_dir, 'train', batch_size=2, block_size=8, vocab_size=512)


# --- sampler ---

def test_batch_shapes_and_dtype(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(500)]})
    x, y = BatchSampler(data_dir, 'train', batch_size=4, block_size=16).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64


def test_targets_are_inputs_shifted_by_one(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(500)]})
    x, y = BatchSampler(data_dir, 'train', batch_size=8, block_size=16).next_batch()
    assert torch.equal(y, x + 1)  # the data is 0, 1, 2, ... so the next token is always +1


def test_windows_never_cross_shards(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(0, 40), np.arange(100, 140)]})
    sampler = BatchSampler(data_dir, 'train', batch_size=64, block_size=8)
    for _ in range(20):
        x, y = sampler.next_batch()
        assert torch.equal(y, x + 1)


def test_every_window_position_can_be_drawn(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(0, 20), np.arange(100, 120)]})
    sampler = BatchSampler(data_dir, 'train', batch_size=256, block_size=8)
    starts = set(sampler.next_batch()[0][:, 0].tolist())
    assert starts == set(range(0, 12)) | set(range(100, 112))


def test_shards_are_weighted_by_size(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(0, 108), np.arange(1000, 1908)]}, vocab_size=2000)
    sampler = BatchSampler(data_dir, 'train', batch_size=1000, block_size=8)
    from_big_shard = (sampler.next_batch()[0][:, 0] >= 1000).float().mean().item()
    assert abs(from_big_shard - 900 / 1000) < 0.03  # 900 of the 1000 window positions are in the big shard


def test_same_seed_and_rank_give_same_batches(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(1000)]})
    a = BatchSampler(data_dir, 'train', batch_size=4, block_size=8, seed=7)
    b = BatchSampler(data_dir, 'train', batch_size=4, block_size=8, seed=7)
    for _ in range(5):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_ranks_draw_different_windows(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(30000)]}, vocab_size=40000)
    r0 = BatchSampler(data_dir, 'train', batch_size=64, block_size=8, rank=0, world_size=2)
    r1 = BatchSampler(data_dir, 'train', batch_size=64, block_size=8, rank=1, world_size=2)
    starts0 = set(r0.next_batch()[0][:, 0].tolist())
    starts1 = set(r1.next_batch()[0][:, 0].tolist())
    assert len(starts0 & starts1) <= 2  # two independent draws of 64 from 30k positions rarely meet


def test_resume_continues_the_same_stream(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(5000)]}, vocab_size=6000)
    sampler = BatchSampler(data_dir, 'train', batch_size=4, block_size=8)
    for _ in range(3):
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch()[0] for _ in range(4)]
    resumed = BatchSampler(data_dir, 'train', batch_size=4, block_size=8)
    resumed.load_state_dict(state)
    assert all(torch.equal(e, resumed.next_batch()[0]) for e in expected)


def test_other_rank_resumes_from_rank0_state(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(5000)]}, vocab_size=6000)
    rank0 = BatchSampler(data_dir, 'train', batch_size=4, block_size=8, rank=0, world_size=2)
    rank1 = BatchSampler(data_dir, 'train', batch_size=4, block_size=8, rank=1, world_size=2)
    for _ in range(3):
        rank0.next_batch(), rank1.next_batch()
    resumed1 = BatchSampler(data_dir, 'train', batch_size=4, block_size=8, rank=1, world_size=2)
    resumed1.load_state_dict(rank0.state_dict())  # only rank 0 saves checkpoints
    assert torch.equal(resumed1.next_batch()[0], rank1.next_batch()[0])


def test_state_dict_loads_with_weights_only(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(500)]})
    sampler = BatchSampler(data_dir, 'train', batch_size=4, block_size=8)
    sampler.next_batch()
    torch.save({'sampler': sampler.state_dict()}, tmp_path / 'ckpt.pt')
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['sampler'] == sampler.state_dict()


def test_reset_repeats_the_same_batches(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(100)], 'val': [np.arange(500)]})
    sampler = BatchSampler(data_dir, 'val', batch_size=4, block_size=8)
    first = [sampler.next_batch()[0] for _ in range(3)]
    sampler.reset()
    assert all(torch.equal(f, sampler.next_batch()[0]) for f in first)


def test_tokens_counts_every_shard(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(100), np.arange(50)]})
    assert BatchSampler(data_dir, 'train', batch_size=1, block_size=8).tokens == 150


def test_masked_tokens_become_ignored_targets(tmp_path):
    tokens = np.arange(200)
    mask = (tokens % 2 == 0).astype(np.uint8)  # train only on even tokens
    data_dir = make_data_dir(tmp_path, {'train': [tokens]}, masks={'train': [mask]})
    x, y = BatchSampler(data_dir, 'train', batch_size=8, block_size=16).next_batch()
    odd_targets = (x + 1) % 2 == 1
    assert (y[odd_targets] == -100).all() and torch.equal(y[~odd_targets], (x + 1)[~odd_targets])


def test_some_shards_without_masks_is_an_error(tmp_path):
    data_dir = make_data_dir(tmp_path, {'train': [np.arange(100), np.arange(100)]})
    shards.write_mask(os.path.join(data_dir, 'train_000000.mask.bin'), np.ones(100))
    with pytest.raises(ShardError, match='train_000001.mask.bin missing'):
        BatchSampler(data_dir, 'train', batch_size=2, block_size=8)


# --- sequential evaluation batches ---

def test_iter_sequential_targets_every_token_once(tmp_path):
    data_dir = make_data_dir(tmp_path, {'val': [np.arange(0, 33), np.arange(100, 117)]})
    targets = torch.cat([y.flatten() for _, y in iter_sequential(data_dir, 'val', batch_size=3, block_size=8)])
    assert sorted(targets.tolist()) == list(range(1, 33)) + list(range(101, 117))


def test_iter_sequential_ranks_split_the_batches(tmp_path):
    data_dir = make_data_dir(tmp_path, {'val': [np.arange(0, 81)]})
    all_x = [x for x, _ in iter_sequential(data_dir, 'val', batch_size=2, block_size=8)]
    rank1 = [x for x, _ in iter_sequential(data_dir, 'val', batch_size=2, block_size=8, rank=1, world_size=2)]
    assert len(rank1) == 2 and torch.equal(rank1[0], all_x[1]) and torch.equal(rank1[1], all_x[3])
