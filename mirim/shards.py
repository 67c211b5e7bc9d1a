"""
Token shards: the .bin files that data/prepare.py writes and train.py / eval.py read.

A shard is a header of 256 little-endian int32 followed by the token ids:

    header[0] MAGIC (20251123)      header[3] number of tokens
    header[1] VERSION (1)           header[4] vocab size
    header[2] bytes per token       header[5:] zero, room to grow

Tokens are uint16 when the vocab fits (vocab_size <= 65536), else uint32. A mask shard
(`train_000000.mask.bin` beside `train_000000.bin`) has the same header with one byte per
token: 1 = this token is a training target, 0 = ignore it (e.g. the prompt when fine-tuning).

A data set folder holds meta.json (tokenizer, vocab, special ids, per-split counts and the list
of shards), the shards, and the tokenizer file. Everything is written to a temporary name and
renamed when complete, so a crash never leaves a half-written file that looks finished.
"""

import contextlib
import json
import os
import warnings

import numpy as np

from mirim.atomic import atomic_file, write_json

MAGIC = 20251123
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MASK_VOCAB = 2  # a mask shard's "vocab": its values are 0 and 1
PREPARE_HINT = ("prepare it first, e.g. `python data/prepare.py --input corpus.txt --tokenizer train:8192 "
                "--out {data_dir}` or, for the embedded Bible corpus, `python data/biblia/prepare.py --lang pt`")


class ShardError(ValueError):
    """A shard or data folder that cannot be used as it is; the message names the file and the problem."""


# -----------------------------------------------------------------------------
# writing

def token_dtype(vocab_size):
    """uint16 while every id fits in it (ids 0..65535), uint32 beyond."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def make_header(bytes_per_token, num_tokens, vocab_size):
    if not 0 <= num_tokens < 2**31:
        raise ValueError(f"a shard holds at most 2**31-1 tokens, got {num_tokens}")
    header = np.zeros(HEADER_INTS, dtype='<i4')
    header[:5] = [MAGIC, VERSION, bytes_per_token, num_tokens, vocab_size]
    return header.tobytes()


def _write_atomic(path, header, array):
    with atomic_file(path) as f:
        f.write(header)
        f.write(np.ascontiguousarray(array).tobytes())


def write_shard(path, tokens, vocab_size):
    """Write one complete token shard at once (tmp file + fsync + rename)."""
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{path}: token ids must lie in [0, {vocab_size}), got min {tokens.min()} max {tokens.max()}")
    _write_atomic(path, make_header(dtype.itemsize, tokens.size, vocab_size), tokens.astype(dtype).ravel())


def write_mask(path, mask):
    """Write a loss-mask shard: one byte per token, 1 = train on it, 0 = ignore it."""
    mask = np.asarray(mask).ravel()
    if mask.size and not np.isin(mask, (0, 1)).all():
        raise ValueError(f"{path}: a mask holds only 0 and 1")
    _write_atomic(path, make_header(1, mask.size, MASK_VOCAB), mask.astype(np.uint8))


def mask_path(shard_path):
    """train_000000.bin -> train_000000.mask.bin"""
    return shard_path[:-len('.bin')] + '.mask.bin'


class ShardWriter:
    """
    Streams tokens of one split into shards of shard_tokens tokens each (the last one shorter),
    named <split>_000000.bin, <split>_000001.bin, ... A shard is written under a .tmp name and
    renamed only once its header holds the final count, so an interrupted run leaves .tmp files,
    never a short shard with a valid header. Documents may continue from one shard into the next.
    Use as a context manager: leaving it with an exception removes the unfinished .tmp files.
    """

    def __init__(self, out_dir, split, vocab_size, shard_tokens=100_000_000, with_mask=False):
        if not 0 < shard_tokens < 2**31:
            raise ValueError(f"shard_tokens must be in [1, 2**31), got {shard_tokens}")
        self.out_dir, self.split, self.vocab_size = out_dir, split, vocab_size
        self.shard_tokens, self.with_mask = shard_tokens, with_mask
        self.dtype = token_dtype(vocab_size)
        self.shards = []        # names of the finished shards
        self.tokens = 0         # tokens written in all shards
        self.files = None       # (token file, mask file or None) of the shard being written
        self.count = 0          # tokens in the shard being written

    def _open(self):
        path = os.path.join(self.out_dir, f"{self.split}_{len(self.shards):06d}.bin")
        # a placeholder header (magic 0) until close: a .tmp file is never readable as a shard
        token_file = open(path + '.tmp', 'wb')
        token_file.write(bytes(HEADER_BYTES))
        mask_file = None
        if self.with_mask:
            mask_file = open(mask_path(path) + '.tmp', 'wb')
            mask_file.write(bytes(HEADER_BYTES))
        self.files, self.count = (token_file, mask_file), 0

    def _finish(self):
        token_file, mask_file = self.files
        for f, bytes_per_token, vocab in ((token_file, self.dtype.itemsize, self.vocab_size), (mask_file, 1, MASK_VOCAB)):
            if f is None:
                continue
            f.seek(0)
            f.write(make_header(bytes_per_token, self.count, vocab))
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(f.name, f.name[:-len('.tmp')])
        self.shards.append(os.path.basename(token_file.name)[:-len('.tmp')])
        self.files = None

    def write(self, tokens, mask=None):
        tokens = np.asarray(tokens, dtype=self.dtype).ravel()
        if self.with_mask:
            if mask is None or len(mask) != len(tokens):
                raise ValueError("this ShardWriter writes masks: pass a mask as long as the tokens")
            mask = np.asarray(mask, dtype=np.uint8).ravel()
        start = 0
        while start < len(tokens):
            if self.files is None:
                self._open()
            take = min(len(tokens) - start, self.shard_tokens - self.count)
            self.files[0].write(tokens[start:start + take].tobytes())
            if self.with_mask:
                self.files[1].write(mask[start:start + take].tobytes())
            self.count += take
            self.tokens += take
            start += take
            if self.count == self.shard_tokens:
                self._finish()

    def close(self):
        """Finish the last shard; returns the names of all shards written."""
        if self.files is not None:
            self._finish()
        return self.shards

    def abort(self):
        """Drop the shard being written (its .tmp files); finished shards stay."""
        if self.files is not None:
            for f in self.files:
                if f is not None:
                    f.close()
                    # gone already when Ctrl-C came inside _finish, after its rename
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(f.name)
            self.files = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -----------------------------------------------------------------------------
# reading

def read_shard(path, vocab_size=None, check_tokens=False, _bytes_per_token=None):
    """
    Memory-map a shard after checking its header: magic, version, bytes per token, file size,
    and (when given) that its vocab size is the expected one. check_tokens=True also scans every
    token for ids >= vocab size (one pass over the file). Raises ShardError naming the problem.
    """
    path = os.fspath(path)
    # the one place a shard is opened: whatever stops its reading (missing, a folder, a symlink loop, no
    # permission) is a ShardError naming it
    try:
        with open(path, 'rb') as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot be read as a shard ({e.strerror or e}); prepare the data again") from None
    if size < HEADER_BYTES or len(head) < HEADER_BYTES:
        raise ShardError(f"{path}: truncated: {size} bytes, less than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(head, dtype='<i4', count=HEADER_INTS)
    magic, version, bytes_per_token, num_tokens, shard_vocab = (int(v) for v in header[:5])
    if magic != MAGIC:
        raise ShardError(f"{path}: not a mirim shard: magic number {magic}, expected {MAGIC}")
    if version != VERSION:
        raise ShardError(f"{path}: format version {version}, this code reads version {VERSION}")
    if bytes_per_token == 1:
        dtype = np.dtype(np.uint8)
    elif bytes_per_token in (2, 4) and shard_vocab >= 1:
        dtype = token_dtype(shard_vocab)
        if dtype.itemsize != bytes_per_token:
            raise ShardError(f"{path}: {bytes_per_token} bytes per token does not match vocab_size {shard_vocab} "
                             f"(expected {dtype.itemsize})")
    else:
        raise ShardError(f"{path}: bad header: {bytes_per_token} bytes per token, vocab_size {shard_vocab}")
    if _bytes_per_token is not None and bytes_per_token != _bytes_per_token:
        kind = 'a mask shard (1 byte per token)' if _bytes_per_token == 1 else 'a token shard'
        raise ShardError(f"{path}: expected {kind}, header says {bytes_per_token} bytes per token")
    if num_tokens < 0:
        raise ShardError(f"{path}: bad header: negative token count {num_tokens}")
    expected = HEADER_BYTES + num_tokens * bytes_per_token
    if size < expected:
        raise ShardError(f"{path}: truncated: header promises {num_tokens} tokens ({expected} bytes), "
                         f"file has {size} bytes")
    if size > expected:
        raise ShardError(f"{path}: {size - expected} bytes more than the {num_tokens} tokens of its header")
    if vocab_size is not None and shard_vocab != vocab_size:
        raise ShardError(f"{path}: written with vocab_size {shard_vocab}, expected {vocab_size} "
                         f"(a different tokenizer than the one in meta.json or the model?)")
    if num_tokens == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map zero bytes
    tokens = np.memmap(path, dtype=dtype, mode='r', offset=HEADER_BYTES, shape=(num_tokens,))
    if check_tokens:
        limit = MASK_VOCAB if bytes_per_token == 1 else shard_vocab
        for start in range(0, num_tokens, 1 << 24):  # in chunks: bounded memory on big shards
            chunk = tokens[start:start + (1 << 24)]
            if chunk.max() >= limit:
                where = start + int(np.argmax(chunk >= limit))
                raise ShardError(f"{path}: token id {int(tokens[where])} at position {where} is >= vocab_size {limit}")
    return tokens


def read_mask(path, num_tokens=None):
    """Memory-map a mask shard; num_tokens, when given, must match its token shard's length."""
    mask = read_shard(path, _bytes_per_token=1)
    if num_tokens is not None and len(mask) != num_tokens:
        raise ShardError(f"{path}: mask has {len(mask)} entries, its token shard has {num_tokens} tokens")
    return mask


def write_meta(data_dir, meta):
    write_json(os.path.join(data_dir, 'meta.json'), meta)


def load_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data folder {data_dir} does not exist: " + PREPARE_HINT.format(data_dir=data_dir))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (never prepared, or preparation did not finish): "
                                + PREPARE_HINT.format(data_dir=data_dir))
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e}); prepare the data again") from None
    except OSError as e:  # a folder, a symlink loop, no permission
        raise ShardError(f"{path}: cannot be read ({e.strerror or e}); prepare the data again") from None
    # the one place meta.json is read: what every reader takes for granted is checked here, naming file and key
    if not isinstance(meta, dict):
        raise ShardError(f"{path}: holds a JSON {type(meta).__name__}, not the object data/prepare.py writes; "
                         f"prepare the data again")
    vocab = meta.get('vocab_size')
    if 'vocab_size' in meta and (not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1):
        raise ShardError(f"{path}: 'vocab_size' is {vocab!r}, not a positive whole number; prepare the data again")
    splits = meta.get('splits')
    if 'splits' in meta and not (isinstance(splits, dict) and all(isinstance(v, dict) for v in splits.values())):
        raise ShardError(f"{path}: 'splits' is not an object of splits as data/prepare.py writes; prepare the data "
                         f"again")
    return meta


def split_shards(data_dir, split, meta=None):
    """Paths of the shards of a split, in order, as listed in meta.json."""
    meta = load_meta(data_dir) if meta is None else meta
    splits = meta.get('splits', {})
    names = splits.get(split, {}).get('shards', [])
    if not names:
        have = ', '.join(s for s in splits if splits[s].get('shards')) or 'none'
        hint = "; prepare it again with a non-zero --val_fraction" if split == 'val' else ""
        raise ShardError(f"{data_dir} has no '{split}' shards (splits with shards: {have}){hint}")
    return [os.path.join(data_dir, name) for name in names]


def data_kind(meta):
    """What a prepared data set holds, from its meta.json: 'preference' (data/prepare_pref.py's pairs, for
    dpo.py), 'chat' (data/prepare_chat.py's loss-masked conversations) or 'tokens' (data/prepare.py's text)."""
    if 'preference' in meta:
        return 'preference'
    splits = meta.get('splits') if isinstance(meta.get('splits'), dict) else {}
    if 'chat' in meta or any(isinstance(s, dict) and 'trained_tokens' in s for s in splits.values()):
        return 'chat'
    return 'tokens'


def has_trained_token(masks):
    """Whether any mask entry is 1, reading the masks in chunks until the first one (cheap for real data,
    whose first chunk has one; a whole pass only for masks that are all 0)."""
    for mask in masks:
        for start in range(0, len(mask), 1 << 22):
            if mask[start:start + (1 << 22)].any():
                return True
    return False


def open_split(data_dir, split, vocab_size=None):
    """Memory-map every shard of a split (and its masks, if any). Returns (meta, paths, tokens, masks or None).
    A loss-masked data set (data_kind 'chat' or 'preference') must have every mask, and a split with masks must
    have a trained token: ShardError otherwise (trained without its masks, a chat set trains on its prompts too;
    with no trained token, the loss reads 0 and learns nothing)."""
    meta = load_meta(data_dir)
    if vocab_size is not None and meta.get('vocab_size') not in (None, vocab_size):
        raise ShardError(f"{data_dir}/meta.json: vocab_size {meta['vocab_size']}, but {vocab_size} expected "
                         f"(the model or tokenizer does not match this data)")
    vocab_size = meta.get('vocab_size', vocab_size)
    paths = split_shards(data_dir, split, meta)
    tokens = [read_shard(p, vocab_size) for p in paths]
    has_mask = [os.path.exists(mask_path(p)) for p in paths]
    kind = data_kind(meta)
    if kind != 'tokens' and not all(has_mask):
        missing = [p for p, m in zip(paths, has_mask) if not m]
        raise ShardError(f"{mask_path(missing[0])} missing{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
                         f": {data_dir}/meta.json describes {kind} data, whose '{split}' shards are loss-masked (only "
                         f"the replies are trained on), and without the .mask.bin files the prompts would be trained "
                         f"on too; copy the masks with the shards, or prepare the data again")
    if any(has_mask) and not all(has_mask):
        missing = [p for p, m in zip(paths, has_mask) if not m]
        raise ShardError(f"{mask_path(missing[0])} missing: some '{split}' shards have masks and others do not")
    masks = [read_mask(mask_path(p), len(t)) for p, t in zip(paths, tokens)] if all(has_mask) else None
    if masks is not None and (meta['splits'][split].get('trained_tokens') == 0 or not has_trained_token(masks)):
        raise ShardError(f"{data_dir}: the '{split}' split has no trained token (every entry of its .mask.bin files "
                         f"is 0): its loss would read 0 and teach nothing; prepare the data again from conversations "
                         f"that have assistant replies")
    return meta, paths, tokens, masks


# -----------------------------------------------------------------------------
# batches

def _to_batch(rows, mask_rows, meta, data_dir, split):
    """Stack block_size+1 windows into (x, y) int64 tensors; masked targets become -100. Token ids
    beyond the vocab (a damaged shard under a valid header) would index past the embedding table:
    one max over the stacked batch finds them, cheaper than reading every shard up front."""
    import torch  # here, not at the top: data/prepare.py uses this module and need not pay torch's 2 s import
    windows = np.stack(rows)
    highest = int(windows.max())
    if highest >= meta['vocab_size']:
        raise ShardError(f"{data_dir}: a '{split}' shard holds token id {highest}, but the vocab has "
                         f"{meta['vocab_size']} ids (a damaged shard, or written by another tokenizer): prepare the "
                         f"data again")
    # numpy makes the int64 copies: torch's multi-threaded .contiguous() was 25x slower on 2 busy cores
    x = windows[:, :-1].astype(np.int64)
    y = windows[:, 1:].astype(np.int64)
    if mask_rows is not None:
        # a mask entry belongs to the token it marks, so the targets' entries are windows[1:]
        y[np.stack(mask_rows)[:, 1:] == 0] = -100
    return torch.from_numpy(x), torch.from_numpy(y)


class BatchSampler:
    """
    Random training batches: each row is a window of block_size+1 consecutive tokens, drawn
    uniformly from every window position of every shard in the split (so shards are weighted by
    size; a window never crosses two shards). x is the window without its last token, y without
    its first; where mask shards exist, y is -100 at tokens whose mask is 0.

    Determinism and resume: rank r draws from PCG64 seeded with SeedSequence(seed, spawn_key=(r,)),
    independent streams per rank. Each row consumes exactly one raw 64-bit draw (start = draw
    mod number of windows; the modulo bias is below n_windows / 2**64), so the state is just the
    number of draws so far, and load_state_dict jumps there with PCG64.advance in O(log n).
    That makes state_dict tiny plain ints, and lets every rank resume from rank 0's saved state
    (it advances its own stream by the same count) instead of every rank saving its own.

    For evaluation, build one sampler on split='val' and call reset() before each evaluation:
    every evaluation then sees the same batches, so val losses are comparable between steps.
    iter_sequential() below instead walks all of a split once.
    """

    def __init__(self, data_dir, split, batch_size, block_size, seed=1337, rank=0, world_size=1, vocab_size=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be positive, got {batch_size} and {block_size}")
        self.data_dir, self.split, self.batch_size, self.block_size = data_dir, split, batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.meta, paths, tokens, masks = open_split(data_dir, split, vocab_size)
        self.tokens = sum(len(t) for t in tokens)
        # shards too short for one window are left out; only an error when no shard is long enough
        keep = [i for i, t in enumerate(tokens) if len(t) > block_size]
        if not keep:
            raise ShardError(f"{data_dir}: block_size {block_size} needs windows of {block_size + 1} tokens, but the "
                             f"longest '{split}' shard has {max(len(t) for t in tokens)} tokens; "
                             f"use a smaller block_size or more data")
        if len(keep) < len(tokens):
            short = [os.path.basename(paths[i]) for i in range(len(tokens)) if i not in keep]
            warnings.warn(f"{data_dir}: {len(short)} '{split}' shard(s) shorter than block_size+1={block_size + 1} "
                          f"tokens are not sampled: {', '.join(short)}")
        # plain ndarray views of the same mapped memory: slicing them is cheaper than slicing np.memmap
        self.shards = [np.asarray(tokens[i]) for i in keep]
        self.masks = [np.asarray(masks[i]) for i in keep] if masks is not None else None
        # window starts 0 .. len-block_size-1 in each shard, numbered consecutively over shards
        self.window_ends = np.cumsum([len(t) - block_size for t in self.shards])
        self.window_firsts = np.concatenate(([0], self.window_ends[:-1]))  # first window number of each shard
        self.windows = int(self.window_ends[-1])
        self.reset()

    def reset(self, draws=0):
        """Go back to the stream position after `draws` raw draws (0 = the very first batch)."""
        self.bit_generator = np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(self.rank,)))
        self.bit_generator.advance(draws)
        self.draws = draws

    def next_batch(self):
        starts = (self.bit_generator.random_raw(self.batch_size) % np.uint64(self.windows)).astype(np.int64)
        self.draws += self.batch_size
        shard_index = np.searchsorted(self.window_ends, starts, side='right')
        places = list(zip(shard_index.tolist(), (starts - self.window_firsts[shard_index]).tolist()))
        n = self.block_size + 1
        rows = [self.shards[s][o:o + n] for s, o in places]
        mask_rows = [self.masks[s][o:o + n] for s, o in places] if self.masks is not None else None
        return _to_batch(rows, mask_rows, self.meta, self.data_dir, self.split)

    def state_dict(self):
        # plain ints and strings: safe for torch.load(weights_only=True)
        return {'draws': self.draws, 'seed': self.seed, 'split': self.split, 'tokens': self.tokens,
                'batch_size': self.batch_size, 'block_size': self.block_size}

    def load_state_dict(self, state):
        if state.get('seed', self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        if state.get('tokens', self.tokens) != self.tokens or state.get('block_size', self.block_size) != self.block_size:
            warnings.warn(f"sampler state was saved for {state.get('tokens')} tokens and block_size "
                          f"{state.get('block_size')}; now {self.tokens} and {self.block_size}: training continues "
                          f"with fresh windows, not exactly where it left off")
        self.reset(int(state['draws']))


def iter_sequential(data_dir, split, batch_size, block_size, rank=0, world_size=1, vocab_size=None, max_batches=None):
    """
    Walk a split once, in order: windows of block_size+1 tokens at start 0, block_size, 2*block_size, ...
    of each shard, so every token but a shard's first is a target exactly once (up to block_size tokens
    at the end of each shard, too few for a full window, are left out). Yields (x, y) as BatchSampler does;
    the last batch may be smaller. With world_size > 1, rank r takes batches r, r+world_size, ...
    (so ranks may get one batch fewer than others). Deterministic: every call yields the same batches.
    """
    meta, _, tokens, masks = open_split(data_dir, split, vocab_size)
    windows = [(s, start) for s, t in enumerate(tokens) for start in range(0, len(t) - block_size, block_size)]
    if not windows:
        raise ShardError(f"{data_dir}: no '{split}' shard holds block_size+1={block_size + 1} tokens; "
                         f"use a smaller block_size or more data")
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]
    n = block_size + 1
    for batch in batches[rank::world_size]:
        rows = [tokens[s][o:o + n] for s, o in batch]
        mask_rows = [masks[s][o:o + n] for s, o in batch] if masks is not None else None
        yield _to_batch(rows, mask_rows, meta, data_dir, split)
