"""
Everything about checkpoints: writing files so that a crash never leaves half of one, what a path
names (a training out_dir, a checkpoint file, a Hugging Face folder), loading a model from any of
them, and building the model a training run starts from (scratch, resume or fine-tune).

A checkpoint is a torch.save'd dict of plain tensors, numbers and strings (loaded with
weights_only=True, so loading never runs code): 'model' (state dict), 'model_config' (LlamaConfig
fields), 'tokenizer' (its whole description), and from train.py also 'config', 'step',
'tokens_seen', 'optimizer', 'scaler', 'sampler', 'rng', 'best_val_loss', 'val_loss', 'val_bpb',
'data_dir'.

torch is imported inside the functions that use it: shards.py, tokenizer.py and the data scripts
write their files through atomic_file too, and need not pay for importing torch.
"""
import fcntl
import json
import math
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import asdict, fields

MODEL_KEYS = ('model', 'model_config', 'tokenizer')  # what every mirim checkpoint holds


class CheckpointError(ValueError):
    """A path that does not hold what it should; the message says what it holds instead."""


# -----------------------------------------------------------------------------
# atomic writes: a temp file, fsync, rename. A reader sees the old file or the new one, never half.

@contextmanager
def atomic_file(path):
    """Open a temp file beside `path` for writing bytes; on success it is fsynced and renamed to
    `path`; on any error (a full disk, Ctrl-C) it is removed and the error goes on, so nothing
    half-written is left behind, and no temp file keeps the disk full."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def write_atomic(path, data):
    """Write bytes to path atomically."""
    with atomic_file(path) as f:
        f.write(data)


def write_json(path, obj):
    write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + '\n').encode('utf-8'))


def save_atomic(obj, path):
    """torch.save obj to path atomically."""
    import torch
    with atomic_file(path) as f:
        torch.save(obj, f)


def fsync_dir(path):
    """Make a rename inside `path` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path or '.', os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def link_atomic(src, dst):
    """dst becomes the same file as src: a hard link (no second write of a big checkpoint), or a copy
    where the file system has no hard links; renamed into place, so also atomic."""
    tmp = f"{dst}.tmp{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# -----------------------------------------------------------------------------
# a run's out_dir: claimed and locked, its log, what is left in it after a failure

def claim_out_dir(out_dir, resume):
    """Make out_dir, check it can be written, and lock it for this run: a second run into the same
    out_dir is refused while this one goes on (the lock is the folder's own flock, so it leaves no
    file behind and goes with the process, even on kill -9). A new run (not resume) never writes
    over a previous run's checkpoints. -> the locked folder's file descriptor (keep it open).
    ValueError says what is wrong."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f'.write_test_{os.getpid()}')
        try:
            with open(probe, 'w') as f:
                f.write('ok')
        finally:
            if os.path.exists(probe):
                os.remove(probe)
        lock = os.open(out_dir, os.O_RDONLY)
    except OSError as e:
        raise ValueError(f"out_dir {out_dir!r} is not writable: {e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        raise ValueError(f"another run is using {out_dir} (a train.py or dpo.py still running); wait for it to "
                         f"end, or choose another --out_dir") from None
    if not resume:
        previous = [f for f in ('ckpt.pt', 'best.pt') if os.path.exists(os.path.join(out_dir, f))]
        if previous:
            os.close(lock)
            raise ValueError(f"{out_dir} already holds a run ({', '.join(previous)}): continue it with "
                             f"--init_from=resume, or choose another --out_dir (or delete it) to start over")
    return lock


def last_good(out_dir):
    """What a run that stops without saving leaves behind, for its error message."""
    path = os.path.join(out_dir, 'ckpt.pt')
    return f"{path} still holds the last good checkpoint" if os.path.exists(path) else "no checkpoint was written"


def open_log(out_dir, step):
    """log.jsonl for appending; on resume (step > 0), lines past the checkpoint's step are dropped
    first (the steps after the last save are trained again, and logged again)."""
    path = os.path.join(out_dir, 'log.jsonl')
    if step > 0 and os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            kept = [line for line in f if line.strip() and json.loads(line).get('step', 0) <= step]
        with open(path, 'w', encoding='utf-8') as f:
            f.writelines(kept)
    return open(path, 'a' if step > 0 else 'w', encoding='utf-8')


def clean_record(record):
    """JSON has no NaN or infinity: such numbers are logged as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class RunLog:
    """A run's log: one JSON line per record in out_dir/log.jsonl, and Weights & Biases when
    c.wandb_log. Only rank 0 writes; on the other ranks it does nothing. Call it with a record."""

    def __init__(self, c, step, rank):
        self.file = self.wandb = None
        if rank != 0:
            return
        write_json(os.path.join(c.out_dir, 'config.json'), vars(c))
        self.file = open_log(c.out_dir, step)
        if c.wandb_log:
            import wandb  # only when asked for: a slow import
            self.wandb = wandb.init(project=c.wandb_project, config=vars(c),
                                    name=c.wandb_run_name or os.path.basename(os.path.abspath(c.out_dir)))

    def __call__(self, record):
        if self.file is not None:
            self.file.write(json.dumps(clean_record(record)) + '\n')
            self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if v is not None}, step=record['step'])

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


# -----------------------------------------------------------------------------
# what a path is

def is_hf_folder(path):
    """A Hugging Face model folder: its config.json describes a model (model_type). train.py also
    writes a config.json into its out_dir, but that one holds training settings."""
    try:
        with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and 'model_type' in config


def resolve(path, checkpoint='ckpt.pt'):
    """-> ('mirim', checkpoint file) or ('hf', folder) for a checkpoint file, a training out_dir
    (its `checkpoint` file) or a Hugging Face model folder; FileNotFoundError saying what is there
    for anything else."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: give a training out_dir, a checkpoint file or a "
                                f"Hugging Face model folder")
    if os.path.isfile(path):
        return 'mirim', path
    file = os.path.join(path, checkpoint)
    if os.path.isfile(file):
        return 'mirim', file
    if is_hf_folder(path):
        return 'hf', path
    found = sorted(f for f in os.listdir(path) if f.endswith('.pt'))
    if found:
        why = (" (best.pt is written at the first evaluation that improves the validation loss)"
               if checkpoint == 'best.pt' else "")
        raise FileNotFoundError(f"{path} has no {checkpoint}{why}; it holds {', '.join(found)}: pick one with "
                                f"--checkpoint=NAME")
    raise FileNotFoundError(f"no checkpoint {file}, and {path} is not a Hugging Face model folder either (no "
                            f"config.json with a model_type); train one first: python train.py config/...")


# -----------------------------------------------------------------------------
# loading

def load_checkpoint(path, keys=MODEL_KEYS):
    """torch.load a checkpoint file (weights only) -> dict; CheckpointError when the file is not a
    checkpoint or lacks one of keys."""
    import pickle
    import zipfile
    import torch
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, KeyError, IndexError,
            OSError) as e:  # what torch.load raises for files that are not checkpoints, truncated ones among them
        first_line = (str(e).strip().splitlines() or [''])[0].split('. ')[0][:200]
        raise CheckpointError(f"{path} is not a mirim checkpoint that can be loaded ({type(e).__name__}: "
                              f"{first_line})") from None
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in keys):
        have = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not a mirim checkpoint: it lacks "
                              f"{[k for k in keys if not isinstance(checkpoint, dict) or k not in checkpoint]} "
                              f"(it holds {have})")
    return checkpoint


def clean_state_dict(state):
    """Drop the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    clean = {}
    for name, value in state.items():
        while name.startswith(('_orig_mod.', 'module.')):
            name = name.split('.', 1)[1]
        clean[name] = value
    return clean


def model_from_checkpoint(checkpoint, dropout=None):
    """The Llama a checkpoint dict holds, in float32 on the CPU."""
    from model import Llama, LlamaConfig
    config = dict(checkpoint['model_config'])
    if dropout is not None:
        config['dropout'] = dropout
    model = Llama(LlamaConfig.from_dict(config))
    model.load_state_dict(clean_state_dict(checkpoint['model']))
    return model


def load_model(path, device='cpu', dtype=None, checkpoint='ckpt.pt'):
    """(model in eval mode, tokenizer, checkpoint dict) from a mirim checkpoint file, a training
    out_dir (its `checkpoint` file) or a Hugging Face Llama folder. The tokenizer comes from the
    checkpoint alone; an HF folder's dict holds just model_config and hf_dir."""
    import torch
    kind, where = resolve(path, checkpoint)
    if kind == 'hf':
        from hf import load_hf
        model, tokenizer = load_hf(where, device, dtype)
        ckpt = {'model_config': asdict(model.config), 'hf_dir': where}
    else:
        from tokenizer import load_tokenizer
        ckpt = load_checkpoint(where)
        model = model_from_checkpoint(ckpt).to(device=device, dtype=dtype).eval()
        tokenizer = load_tokenizer(ckpt['tokenizer'])
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # a diverged run's weights: samples, scores and exports of them would all be NaN
        raise CheckpointError(f"{where} holds non-finite weights (NaN or inf in {len(bad)} tensors, e.g. {bad[0]}): "
                              f"the run that saved it diverged; use an earlier checkpoint")
    return model, tokenizer, ckpt


# -----------------------------------------------------------------------------
# random state, so that a resumed run draws what the uninterrupted run would have

def rng_state():
    """This process's random states as plain tensors, lists and ints (safe for weights_only loading)."""
    import numpy as np
    import torch
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {'torch': torch.get_rng_state(), 'numpy': [np_state[0], np_state[1].tolist(), *np_state[2:]],
             'python': [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    import numpy as np
    import torch
    torch.set_rng_state(state['torch'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


# -----------------------------------------------------------------------------
# the model a training run starts from

SHAPE_KEYS = ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'ffn_hidden', 'activation', 'rope_theta', 'norm_eps',
              'tie_embeddings')


def requested_model_config(cfg, meta):
    """The model a scratch run builds from a training config: the preset, then the shape keys set in
    the config, with the data's vocab size (unless vocab_size is set) and special token ids."""
    from model import PRESETS, LlamaConfig, depth_shape
    if cfg['model'] == 'auto':  # the depth dial: the shape follows from cfg['depth']
        shape = {**asdict(LlamaConfig()), **depth_shape(cfg.get('depth'))}
    elif cfg['model'] not in PRESETS:
        raise ValueError(f"model={cfg['model']!r} is not a preset; choose one of {', '.join(sorted(PRESETS))} "
                         f"or 'auto' (with depth)")
    else:
        shape = {**asdict(LlamaConfig()), **PRESETS[cfg['model']]}
    shape.update({k: cfg[k] for k in SHAPE_KEYS + ('block_size',) if cfg[k] is not None})
    if cfg['vocab_size'] and meta.get('vocab_size') and cfg['vocab_size'] < meta['vocab_size']:
        raise ValueError(f"vocab_size={cfg['vocab_size']} is smaller than the data's vocab of {meta['vocab_size']} "
                         f"tokens (leave vocab_size unset to use the data's)")
    shape['vocab_size'] = cfg['vocab_size'] or meta['vocab_size']
    shape['dropout'] = cfg['dropout']
    for key in ('bos_id', 'eos_id', 'pad_id'):
        if key in meta:
            shape[key] = meta[key]
    try:
        return LlamaConfig(**shape)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model shape: {e}") from None


def differences(want, have, keys):
    return [f"{k}={have.get(k)!r} (this config: {want.get(k)!r})" for k in keys if want.get(k) != have.get(k)]


# the file data/prepare.py leaves in a data folder for each kind of tokenizer (data/prepare.py's TOKENIZER_FILE_OF)
TOKENIZER_FILE = {'sentencepiece': 'tokenizer.model', 'tokenizers': 'tokenizer.json', 'tiktoken': 'tokenizer.tiktoken'}


def tokenizer_spec_hint(description, data_dir=None):
    """What to pass as data/prepare.py --tokenizer to get this tokenizer again, and its kind in words:
    a file in the model's data folder (when the checkpoint's config names it), a tiktoken name, 'bytes'."""
    kind = description.get('kind')
    words = {'sentencepiece': 'a SentencePiece tokenizer.model', 'tokenizers': 'a tokenizer.json',
             'tiktoken': f"tiktoken {description.get('name') or 'ranks'}", 'bytes': 'raw bytes'}.get(kind, kind)
    words += f" of {description['vocab_size']:,} pieces" if description.get('vocab_size') else ''
    if kind == 'bytes':
        return words, 'bytes'
    if kind == 'tiktoken' and description.get('name'):
        return words, f"tiktoken:{description['name']}"
    file = TOKENIZER_FILE.get(kind, 'tokenizer file')
    spec = os.path.join(data_dir, file) if data_dir else f"<the model's data dir>/{file}"
    return words, f"tiktoken:{spec}" if kind == 'tiktoken' else spec


def check_tokenizer(checkpoint, tokenizer, data_dir, path):
    """A model trained on one tokenizer's ids must not go on with another's."""
    from tokenizer import load_tokenizer, same_tokenizer
    if 'tokenizer' in checkpoint and not same_tokenizer(load_tokenizer(checkpoint['tokenizer']), tokenizer):
        model_data = (checkpoint.get('config') or {}).get('data_dir')
        if model_data and os.path.abspath(model_data) == os.path.abspath(data_dir):
            model_data = None  # prepared again since: its tokenizer file is now the other one
        words, spec = tokenizer_spec_hint(checkpoint['tokenizer'], model_data)
        raise ValueError(f"{data_dir} was tokenized with another tokenizer ({tokenizer.kind}, "
                         f"{tokenizer.vocab_size:,} pieces) than the model in {path}, whose tokenizer is {words}: "
                         f"prepare the data with the model's tokenizer (data/prepare.py --tokenizer {spec})")


def check_hf_tokenizer(folder, tokenizer, data_dir):
    """A Hugging Face folder's model must go on with its own tokenizer's ids (when the folder has one)."""
    from hf import read_hf_tokenizer
    from tokenizer import same_tokenizer
    try:
        theirs = read_hf_tokenizer(folder)
    except FileNotFoundError:  # weights only: nothing to compare with
        return
    if not same_tokenizer(theirs, tokenizer):
        raise ValueError(f"{data_dir} was tokenized with another tokenizer than the model in {folder}: prepare the "
                         f"data with the model's tokenizer (data/prepare.py --tokenizer {folder})")


def build_model(cfg, meta, tokenizer, say=print):
    """The model a training run starts from -> (model on the CPU in float32, checkpoint dict when
    resuming else None). cfg['init_from'] is 'scratch', 'resume' (out_dir/ckpt.pt: same shape, same
    tokenizer) or a mirim checkpoint / HF folder to fine-tune (its shape; weights only). tokenizer is
    the data's. ValueError / FileNotFoundError say what does not fit."""
    from model import Llama, LlamaConfig
    init_from = cfg['init_from']
    if init_from == 'scratch':
        return Llama(requested_model_config(cfg, meta), seed=cfg['seed']), None

    if init_from == 'resume':
        path = os.path.join(cfg['out_dir'], 'ckpt.pt')
        if not os.path.exists(path):
            raise FileNotFoundError(f"init_from='resume' but {path} does not exist; start with --init_from=scratch")
        checkpoint = load_checkpoint(path)
        keys = [f.name for f in fields(LlamaConfig) if f.name != 'dropout']
        diff = differences(asdict(requested_model_config(cfg, meta)), checkpoint['model_config'], keys)
        if diff:
            raise ValueError(f"{path} holds a model of a different shape: {'; '.join(diff)}. Resume with the config "
                             f"that started the run, or train this one in another out_dir")
        check_tokenizer(checkpoint, tokenizer, cfg['data_dir'], path)
        return model_from_checkpoint(checkpoint, cfg['dropout']), checkpoint

    # fine-tuning: weights from a mirim checkpoint or a Hugging Face folder, the rest starts fresh
    kind, where = resolve(init_from)
    if kind == 'hf':
        from hf import load_hf
        model, _ = load_hf(where, tokenizer=False)
        check_hf_tokenizer(where, tokenizer, cfg['data_dir'])
        source, state = asdict(model.config), model.state_dict()
    else:
        checkpoint = load_checkpoint(where)
        check_tokenizer(checkpoint, tokenizer, cfg['data_dir'], init_from)
        source, state = checkpoint['model_config'], clean_state_dict(checkpoint['model'])
    asked = {k: cfg[k] for k in SHAPE_KEYS + ('vocab_size',) if cfg[k] is not None}
    diff = differences(asked, source, asked)
    if diff:
        raise ValueError(f"{init_from} holds a model with {'; '.join(diff)}; fine-tuning keeps the model's shape, "
                         f"so leave those keys unset")
    say(f"fine-tuning the weights of {init_from} (its shape; the 'model' preset is not used; optimizer fresh)")
    model = Llama(LlamaConfig.from_dict({**source, 'dropout': cfg['dropout']}))
    model.load_state_dict(state)
    return model, None
