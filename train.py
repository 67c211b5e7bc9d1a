"""
Train a mirim model: one process on a laptop or a GPU, or many under torchrun, with the same file.

    python train.py config/train_biblia_pt.py                          # the CPU demo
    python train.py config/train_biblia_pt.py --batch_size=32 --max_iters=100
    torchrun --standalone --nproc_per_node=8 train.py config/ttl_160m.py

Work is never lost: checkpoints are written atomically (ckpt.pt latest, best.pt best validation
loss), Ctrl-C or SIGTERM finishes the step, saves and exits cleanly, and --init_from=resume
continues exactly where the run stopped (model, optimizer, data position, random state).

The data decides which batch every micro-step sees: micro-batch j of each step (j < the global
gradient_accumulation_steps) is drawn from its own random stream j (shards.BatchSampler with
rank=j), whichever process runs it. So one process with 8 accumulation steps and 8 processes
with one each train on the same tokens, and a run can resume on a different number of GPUs.
"""

import dataclasses
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from configurator import ConfigError, configure, print_config
from tokenizer import load_tokenizer, same_tokenizer, write_atomic

# -----------------------------------------------------------------------------
# Default config. A config file (config/*.py) or --key=value overrides any of these.
# I/O
out_dir = 'out'                   # ckpt.pt (latest), best.pt (best val loss), log.jsonl, config.json
data_dir = 'data/biblia/pt'       # meta.json + shards, from data/prepare.py or data/biblia/prepare.py
init_from = 'scratch'             # 'scratch' | 'resume' (out_dir/ckpt.pt) | a mirim checkpoint (file or
                                  # out_dir) or a Hugging Face Llama folder to fine-tune (weights only)
eval_interval = 250               # steps between evaluations; each one also saves ckpt.pt
eval_iters = 20                   # batches per evaluation, the same windows every time
log_interval = 10                 # steps between log.jsonl lines
wandb_log = False                 # also log to Weights & Biases (WANDB_MODE=offline works)
wandb_project = 'mirim'
wandb_run_name = ''               # '' = the out_dir's name
# model: a preset from model.PRESETS; any shape key set below replaces the preset's value
model = 'demo'
n_layer = None
n_head = None
n_kv_head = None
n_embd = None
ffn_hidden = None
activation = None                 # 'silu' (SwiGLU) | 'gelu' | 'gelu_tanh' (GeGLU)
rope_theta = None
norm_eps = None
tie_embeddings = None
vocab_size = None                 # None = the data's vocab (meta.json), replacing the preset's; may be larger
block_size = None                 # context length trained on; None = the model's (a scratch model gets this context)
dropout = 0.0
# batch: tokens per optimizer step = batch_size * block_size * gradient_accumulation_steps
batch_size = 16                   # sequences per micro-batch, per process
gradient_accumulation_steps = 1   # micro-batches per step over ALL processes (divided among DDP ranks)
# optimizer: AdamW, weight decay on matrices only
learning_rate = 1e-3
min_lr = 1e-4                     # the schedule ends here
lr_schedule = 'cosine'            # 'cosine' | 'wsd' (warmup-stable-decay) | 'constant', after a linear warmup
warmup_iters = 100
lr_decay_iters = 0                # the step the schedule reaches min_lr; 0 = max_iters
wsd_decay_fraction = 0.2          # wsd: the last fraction of lr_decay_iters decays linearly to min_lr
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                   # clip the global gradient norm to this; 0 = no clipping
max_iters = 5000                  # optimizer steps in all
max_time = 0.0                    # seconds: evaluate, save and stop once this run has lasted this long; 0 = no limit
# system
device = 'auto'                   # 'auto' (cuda, then mps, then cpu) | 'cpu' | 'cuda' | 'mps'
dtype = 'auto'                    # 'float32' | 'bfloat16' | 'float16' (GradScaler); auto = bf16 (else fp16) on CUDA, fp32 elsewhere
compile = False                   # torch.compile the model (faster on GPU after a minute of compiling)
device_peak_flops = 0.0           # FLOP/s of one device, for MFU; 0 = look it up (A100/H100/H200 bf16) or skip MFU
seed = 1337

DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and k != 'DEFAULTS'
            and isinstance(v, (int, float, bool, str, type(None)))}
SHAPE_KEYS = ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'ffn_hidden', 'activation', 'rope_theta', 'norm_eps',
              'tie_embeddings')
# dense bf16 tensor-core peaks (FLOP/s) from NVIDIA's data sheets, matched against the device name
PEAK_FLOPS = [('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('A100', 312e12)]


def fail(message):
    """Stop with an error message (from rank 0 only, so torchrun prints it once)."""
    raise SystemExit(f"train.py: error: {message}" if int(os.environ.get('RANK', 0)) == 0 else 1)


# -----------------------------------------------------------------------------
# learning rate schedule

def get_lr(step, cfg):
    """The learning rate for optimizer step `step` (0-based): a linear warmup to learning_rate, then
    cosine to min_lr at lr_decay_iters, or WSD (flat, then linear to min_lr over the last
    wsd_decay_fraction), or constant."""
    lr, low = cfg['learning_rate'], cfg['min_lr']
    warmup = cfg['warmup_iters']
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    end = cfg['lr_decay_iters'] or cfg['max_iters']
    if cfg['lr_schedule'] == 'constant':
        return lr
    if cfg['lr_schedule'] == 'wsd':
        decay_steps = max(1, round(end * cfg['wsd_decay_fraction']))
        progress = min(1.0, max(0.0, (step - (end - decay_steps)) / decay_steps))
        return lr - (lr - low) * progress
    if step >= end:
        return low
    progress = (step - warmup) / max(1, end - warmup)
    return low + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - low)


# -----------------------------------------------------------------------------
# devices and precision

def device_for(name, local_rank):
    from model import resolve_device
    try:
        name = resolve_device(name)
    except ValueError as e:
        fail(str(e))
    if name.startswith('cuda') and local_rank is not None:
        name = f'cuda:{local_rank}'  # torchrun: one GPU per process
    return name


def cpu_bf16_slowdown():
    """How many times slower a bf16 matmul is than a float32 one on this CPU: about 1 or less with
    native bf16 (AVX512-BF16, AMX, Arm BF16), 10-20x where PyTorch has to emulate it."""
    a = torch.randn(256, 256)
    b = a.bfloat16()

    def fastest(m):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            m @ m
            times.append(time.perf_counter() - start)
        return min(times)
    return fastest(b) / fastest(a)


def resolve_dtype(name, device_type, say):
    if name == 'auto':
        if device_type == 'cuda':
            return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
        return 'float32'
    if name not in ('float32', 'bfloat16', 'float16'):
        fail(f"dtype={name!r}: expected 'auto', 'float32', 'bfloat16' or 'float16'")
    if device_type == 'cpu' and name == 'float16':
        fail("dtype='float16' is for GPUs; on CPU use 'bfloat16' (where the CPU has it) or 'float32'")
    if device_type == 'cpu' and name == 'bfloat16':
        slowdown = cpu_bf16_slowdown()
        if slowdown > 2.0:
            say(f"note: dtype='bfloat16' asked for, but this CPU has no native bf16 (a bf16 matmul measured "
                f"{slowdown:.1f}x slower than float32; it needs AVX512-BF16, AMX or Arm BF16): training in float32")
            return 'float32'
    return name


def peak_flops(cfg, device, dtype_name):
    if cfg['device_peak_flops']:
        return cfg['device_peak_flops']
    if device.startswith('cuda') and dtype_name in ('bfloat16', 'float16'):
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in PEAK_FLOPS if key in name), None)
    return None


def memory_gb(device):
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak resident set: KiB on Linux, bytes on macOS
    return peak / 1e9 if sys.platform == 'darwin' else peak * 1024 / 1e9


# -----------------------------------------------------------------------------
# checkpoints

def save_atomic(obj, path):
    """torch.save to a temp file, flush + fsync, then rename over `path`: a crash at any moment
    leaves either the old file or the new one, never half of one."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        if os.environ.get('MIRIM_TEST_SAVE_DELAY'):  # tests kill -9 the process here, mid-write
            f.flush()
            time.sleep(float(os.environ['MIRIM_TEST_SAVE_DELAY']))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


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
    tmp = dst + '.tmp'
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def clean_state_dict(state):
    """Drop the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    clean = {}
    for name, value in state.items():
        while name.startswith(('_orig_mod.', 'module.')):
            name = name.split('.', 1)[1]
        clean[name] = value
    return clean


def rng_state():
    """This process's random states as plain tensors, lists and ints (safe for weights_only loading)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {'torch': torch.get_rng_state(), 'numpy': [np_state[0], np_state[1].tolist(), *np_state[2:]],
             'python': [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def load_checkpoint(path):
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        fail(f"cannot load checkpoint {path}: {type(e).__name__}: {e}")


# -----------------------------------------------------------------------------
# the model

def requested_model_config(cfg, meta):
    """The model a scratch run builds: the preset, then the shape keys set in the config, with the
    data's vocab size (unless vocab_size is set) and the data's special token ids."""
    from model import PRESETS, LlamaConfig
    if cfg['model'] not in PRESETS:
        fail(f"model={cfg['model']!r} is not a preset; choose one of {', '.join(sorted(PRESETS))}")
    shape = {**dataclasses.asdict(LlamaConfig()), **PRESETS[cfg['model']]}
    shape.update({k: cfg[k] for k in SHAPE_KEYS + ('block_size',) if cfg[k] is not None})
    if cfg['vocab_size'] and cfg['vocab_size'] < meta['vocab_size']:
        fail(f"vocab_size={cfg['vocab_size']} is smaller than the data's vocab of {meta['vocab_size']} tokens "
             f"(leave vocab_size unset to use the data's)")
    shape['vocab_size'] = cfg['vocab_size'] or meta['vocab_size']
    shape['dropout'] = cfg['dropout']
    for key in ('bos_id', 'eos_id', 'pad_id'):
        if key in meta:
            shape[key] = meta[key]
    try:
        return LlamaConfig(**shape)
    except (TypeError, ValueError) as e:
        fail(f"model shape: {e}")


def differences(want, have, keys):
    return [f"{k}={have.get(k)!r} (this config: {want.get(k)!r})" for k in keys if want.get(k) != have.get(k)]


def build_model(cfg, meta, say, tokenizer):
    """-> (model on CPU in float32, checkpoint dict when resuming else None). tokenizer is the data's:
    a model fine-tuned on data from another tokenizer would read the wrong ids."""
    from model import Llama, LlamaConfig
    want = requested_model_config(cfg, meta) if cfg['init_from'] in ('scratch', 'resume') else None
    if cfg['init_from'] == 'scratch':
        return Llama(want, seed=cfg['seed']), None

    if cfg['init_from'] == 'resume':
        path = os.path.join(cfg['out_dir'], 'ckpt.pt')
        if not os.path.exists(path):
            fail(f"init_from='resume' but {path} does not exist; start with --init_from=scratch")
        checkpoint = load_checkpoint(path)
        have = checkpoint['model_config']
        keys = [f.name for f in dataclasses.fields(LlamaConfig) if f.name != 'dropout']
        diff = differences(dataclasses.asdict(want), have, keys)
        if diff:
            fail(f"{path} holds a model of a different shape: {'; '.join(diff)}. Resume with the config "
                 f"that started the run, or train this one in another out_dir")
        model = Llama(LlamaConfig.from_dict({**have, 'dropout': cfg['dropout']}))
        model.load_state_dict(clean_state_dict(checkpoint['model']))
        return model, checkpoint

    # fine-tuning: weights from a mirim checkpoint or a Hugging Face folder, the rest starts fresh
    path = cfg['init_from']
    is_hf = os.path.isdir(path) and not os.path.exists(os.path.join(path, 'ckpt.pt')) \
        and os.path.exists(os.path.join(path, 'config.json'))
    if is_hf:
        try:
            from export import load_hf
        except ImportError as e:
            fail(f"init_from={path!r} is a Hugging Face folder, which needs export.py's load_hf ({e})")
        try:
            model, _ = load_hf(path, tokenizer=False)
        except (OSError, ValueError, KeyError) as e:
            fail(f"cannot load the Hugging Face model in {path}: {e}")
        source = dataclasses.asdict(model.config)
        state = model.state_dict()
    else:
        file = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
        if not os.path.isfile(file):
            fail(f"init_from={path!r} is neither 'scratch', 'resume', a mirim checkpoint (file or out_dir with "
                 f"ckpt.pt) nor a Hugging Face folder (with config.json)")
        checkpoint = load_checkpoint(file)
        source, state = checkpoint['model_config'], clean_state_dict(checkpoint['model'])
        if 'tokenizer' in checkpoint and not same_tokenizer(load_tokenizer(checkpoint['tokenizer']), tokenizer):
            fail(f"{cfg['data_dir']} was tokenized with another tokenizer than the model in {path}: prepare the data "
                 f"with the model's tokenizer (data/prepare.py --tokenizer <the model's data dir>/tokenizer.model)")
    asked = {k: cfg[k] for k in SHAPE_KEYS + ('vocab_size',) if cfg[k] is not None}
    diff = differences(asked, source, asked)
    if diff:
        fail(f"{path} holds a model with {'; '.join(diff)}; fine-tuning keeps the model's shape, so leave "
             f"those keys unset")
    say(f"fine-tuning the weights of {path} (its shape; the 'model' preset is not used; optimizer fresh)")
    model = Llama(LlamaConfig.from_dict({**source, 'dropout': cfg['dropout']}))
    model.load_state_dict(state)
    return model, None


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model, sampler, iters, rank, world_size, device, autocast):
    """Mean loss over `iters` batches that are the same at every call (the sampler is reset); under
    DDP each process takes every world_size-th batch and the sums are added up."""
    model.eval()
    sampler.reset()
    total = torch.zeros((), device=device)
    for i in range(iters):
        x, y = sampler.next_batch()  # every rank draws every batch, to stay in step
        if i % world_size != rank:
            continue
        with autocast:
            _, loss = model(x.to(device), y.to(device), return_logits=False)
        total += loss.float()
    if world_size > 1:
        torch.distributed.all_reduce(total)
    model.train()
    return total.item() / iters


def bits_per_byte(loss, split_meta):
    """nats per token -> bits per UTF-8 byte of text, comparable across tokenizers. None for loss-masked
    data (chat SFT): its bytes count prompt text that the loss skips."""
    if not split_meta.get('bytes') or not split_meta.get('tokens') or 'trained_tokens' in split_meta:
        return None
    return loss / math.log(2) * split_meta['tokens'] / split_meta['bytes']


def bpb_text(bpb):
    return f" ({bpb:.3f} bpb)" if bpb is not None else ""


# -----------------------------------------------------------------------------
# main

def check_config(cfg):
    checks = [
        (cfg['lr_schedule'] in ('cosine', 'wsd', 'constant'), "lr_schedule must be 'cosine', 'wsd' or 'constant'"),
        (cfg['batch_size'] >= 1, "batch_size must be at least 1"),
        (cfg['gradient_accumulation_steps'] >= 1, "gradient_accumulation_steps must be at least 1"),
        (cfg['max_iters'] >= 1, "max_iters must be at least 1"),
        (cfg['eval_interval'] >= 1 and cfg['eval_iters'] >= 1 and cfg['log_interval'] >= 1,
         "eval_interval, eval_iters and log_interval must be at least 1"),
        (cfg['block_size'] is None or (isinstance(cfg['block_size'], int) and cfg['block_size'] >= 1),
         "block_size must be a positive integer (or None: the model's)"),
        (cfg['vocab_size'] is None or (isinstance(cfg['vocab_size'], int) and cfg['vocab_size'] >= 1),
         "vocab_size must be a positive integer (or None: the data's)"),
        (0 <= cfg['wsd_decay_fraction'] <= 1, "wsd_decay_fraction must be between 0 and 1"),
        (cfg['learning_rate'] >= 0 and cfg['min_lr'] >= 0 and cfg['warmup_iters'] >= 0, "learning rates and "
         "warmup_iters must not be negative"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)


def main(argv):
    start_time = time.time()
    try:
        cfg = configure(DEFAULTS, argv, help_source=__file__)  # --help reads the comments above
    except ConfigError as e:
        fail(str(e))
    check_config(cfg)

    # --- processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for each one
    ddp = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    rank, local_rank, world_size = (int(os.environ['RANK']), int(os.environ['LOCAL_RANK']),
                                    int(os.environ['WORLD_SIZE'])) if ddp else (0, None, 1)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    accumulation = cfg['gradient_accumulation_steps']
    if accumulation % world_size:
        fail(f"gradient_accumulation_steps={accumulation} counts micro-batches over all {world_size} processes, "
             f"so it must be a multiple of {world_size}")
    device = device_for(cfg['device'], local_rank)
    device_type = device.split(':')[0]
    if ddp:
        if device_type == 'cuda':
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
    old_handlers = {}
    try:
        return train(cfg, rank, world_size, master, say, device, device_type, start_time, old_handlers)
    finally:
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
        if ddp:
            torch.distributed.destroy_process_group()


def train(cfg, rank, world_size, master, say, device, device_type, start_time, old_handlers):
    from shards import BatchSampler, ShardError, load_meta
    ddp = world_size > 1 or 'RANK' in os.environ
    out_dir = cfg['out_dir']
    torch.manual_seed(cfg['seed'] + rank)  # dropout differs between ranks; the weights come from `seed` alone
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --- out_dir: make sure it can be written before spending any time
    if master:
        try:
            os.makedirs(out_dir, exist_ok=True)
            probe = os.path.join(out_dir, f'.write_test_{os.getpid()}')
            with open(probe, 'w') as f:
                f.write('ok')
            os.remove(probe)
        except OSError as e:
            fail(f"out_dir {out_dir!r} is not writable: {e.strerror or e}")
        if cfg['init_from'] != 'resume' and os.path.exists(os.path.join(out_dir, 'ckpt.pt')):
            fail(f"{out_dir} already holds a checkpoint (ckpt.pt): continue it with --init_from=resume, or choose "
                 f"another --out_dir (or delete it) to start over")

    # --- data and tokenizer
    data_dir = cfg['data_dir']
    try:
        meta = load_meta(data_dir)
        tokenizer = load_tokenizer(meta['tokenizer'], base_dir=data_dir)
    except (FileNotFoundError, ShardError, KeyError, ValueError) as e:
        fail(f"data {data_dir}: {e}")

    # --- model
    model, checkpoint = build_model(cfg, meta, say, tokenizer)
    config = model.config
    if meta['vocab_size'] > config.vocab_size:
        fail(f"the data in {data_dir} has a vocab of {meta['vocab_size']} tokens but the model only "
             f"{config.vocab_size} embeddings; use a model with vocab_size >= {meta['vocab_size']}")
    block_size = cfg['block_size'] or config.block_size
    if block_size > config.block_size:
        fail(f"block_size={block_size} is longer than the model's context ({config.block_size} positions)")

    # --- batches: micro-batch j of every step comes from stream j (see the docstring)
    local_steps = cfg['gradient_accumulation_steps'] // world_size
    slots = range(rank * local_steps, (rank + 1) * local_steps)
    try:
        samplers = [BatchSampler(data_dir, 'train', cfg['batch_size'], block_size, seed=cfg['seed'], rank=j,
                                 world_size=cfg['gradient_accumulation_steps']) for j in slots]
        # evaluation: fixed windows of each split, from a seed of their own
        eval_samplers = {split: BatchSampler(data_dir, split, cfg['batch_size'], block_size, seed=cfg['seed'] + 1)
                         for split in ('train', 'val')}
    except (FileNotFoundError, ShardError) as e:
        fail(str(e))
    tokens_per_step = cfg['batch_size'] * block_size * cfg['gradient_accumulation_steps']

    # --- precision, optimizer
    dtype_name = resolve_dtype(cfg['dtype'], device_type, say)
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype_name]
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    model.to(device)
    optimizer = model.configure_optimizer(cfg['weight_decay'], cfg['learning_rate'], (cfg['beta1'], cfg['beta2']),
                                          device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    step, tokens_seen, best_val_loss, val_loss, val_bpb = 0, 0, float('inf'), None, None
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint['optimizer'])
        scaler.load_state_dict(checkpoint['scaler'])
        for sampler in samplers:  # every stream has drawn as many batches as stream 0
            sampler.load_state_dict(checkpoint['sampler'])
        step, tokens_seen = checkpoint['step'], checkpoint['tokens_seen']
        best_val_loss, val_loss, val_bpb = checkpoint['best_val_loss'], checkpoint['val_loss'], checkpoint['val_bpb']
        rng = checkpoint['rng']
        set_rng_state(rng[rank] if rank < len(rng) else rng[0])
        changed = [f"{k}: {checkpoint['config'].get(k)!r} -> {cfg[k]!r}" for k in cfg
                   if k in checkpoint['config'] and checkpoint['config'][k] != cfg[k] and k != 'init_from']
        say(f"resuming {out_dir}/ckpt.pt at step {step} ({tokens_seen:,} tokens seen)"
            + (f"; changed since: {', '.join(changed)}" if changed else ""))
        checkpoint = None  # free the memory
        if step >= cfg['max_iters']:
            say(f"nothing to do: the checkpoint is at step {step}, max_iters is {cfg['max_iters']}")
            return

    raw_model = model
    if cfg['compile']:
        say("compiling the model (torch.compile)...")
        model = torch.compile(model)
    eval_model = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        # broadcast_buffers off: the only buffers are RoPE tables, identical everywhere
        model = DistributedDataParallel(model, device_ids=[device] if device_type == 'cuda' else None,
                                        broadcast_buffers=False)
    peak = peak_flops(cfg, device, dtype_name)

    # --- tell the user what is about to happen; save the resolved config
    splits = meta['splits']
    say("config:")
    print_config(cfg, say)
    say(f"model: {raw_model.num_params() / 1e6:.2f}M parameters without embeddings "
        f"({raw_model.num_params(non_embedding=False) / 1e6:.2f}M in all): {config.n_layer} layers, "
        f"width {config.n_embd}, {config.n_head} heads ({config.n_kv_head} kv), vocab {config.vocab_size}, "
        f"context {config.block_size}")
    say(f"data: {data_dir}: {splits['train']['tokens']:,} train tokens, {splits['val']['tokens']:,} val tokens; "
        f"tokenizer {tokenizer.kind}, vocab {meta['vocab_size']}")
    total_tokens = tokens_per_step * cfg['max_iters']
    say(f"tokens per step: {cfg['batch_size']} x {block_size} x {cfg['gradient_accumulation_steps']} = "
        f"{tokens_per_step:,}; {cfg['max_iters']} steps = {total_tokens:,} tokens "
        f"({total_tokens / splits['train']['tokens']:.1f} epochs)")
    say(f"device {device}, dtype {dtype_name}, {world_size} process{'es' if world_size > 1 else ''}, "
        f"compile {'on' if cfg['compile'] else 'off'}")
    resumed = step > 0 and cfg['init_from'] == 'resume'
    if master:
        write_atomic(os.path.join(out_dir, 'config.json'), (json.dumps(cfg, indent=2) + '\n').encode('utf-8'))
        log_file = open(os.path.join(out_dir, 'log.jsonl'), 'a' if resumed else 'w', encoding='utf-8')
    wandb_run = None
    if master and cfg['wandb_log']:
        import wandb  # only when asked for: a slow import
        wandb_run = wandb.init(project=cfg['wandb_project'],
                               name=cfg['wandb_run_name'] or os.path.basename(os.path.abspath(out_dir)), config=cfg)

    def log(record):
        if master:
            log_file.write(json.dumps(record) + '\n')
            log_file.flush()
            if wandb_run is not None:
                wandb_run.log({k: v for k, v in record.items() if v is not None}, step=record['step'])

    def run_eval():
        losses = {}
        for split, sampler in eval_samplers.items():
            loss = evaluate(eval_model, sampler, cfg['eval_iters'], rank, world_size, device, autocast)
            losses[f'{split}_loss'], losses[f'{split}_bpb'] = loss, bits_per_byte(loss, splits[split])
        return losses

    def save(val_losses):
        """Write ckpt.pt (and best.pt when validation improved). Every rank calls this (to hand
        rank 0 its random state); only rank 0 writes."""
        nonlocal best_val_loss
        states = [None] * world_size
        if world_size > 1:
            torch.distributed.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        improved = val_losses is not None and val_losses['val_loss'] < best_val_loss
        if improved:
            best_val_loss = val_losses['val_loss']
        if not master:
            return ''
        ckpt = {'model': raw_model.state_dict(), 'model_config': dataclasses.asdict(raw_model.config),
                'config': cfg, 'tokenizer': tokenizer.to_dict(), 'step': step, 'tokens_seen': tokens_seen,
                'best_val_loss': best_val_loss, 'val_loss': val_loss, 'val_bpb': val_bpb,
                'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                'sampler': samplers[0].state_dict(), 'rng': states, 'data_dir': data_dir}
        path = os.path.join(out_dir, 'ckpt.pt')
        save_atomic(ckpt, path)
        if improved:
            link_atomic(path, os.path.join(out_dir, 'best.pt'))
        return 'saved ckpt.pt' + (' and best.pt' if improved else '')

    # --- Ctrl-C / SIGTERM: finish the step, save, exit cleanly. A second Ctrl-C stops at once.
    stop_signal = []

    def on_signal(signum, frame):
        if stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop_signal.append(signal.Signals(signum).name)
    for signum in (signal.SIGINT, signal.SIGTERM):
        old_handlers[signum] = signal.signal(signum, on_signal)

    from tqdm import tqdm
    bar = tqdm(total=cfg['max_iters'], initial=step, unit='step', dynamic_ncols=True,
               disable=not (master and sys.stderr.isatty()))
    say_line = bar.write if not bar.disable else say

    if step == 0:  # where the run starts from
        losses = run_eval()
        val_loss, val_bpb = losses['val_loss'], losses['val_bpb']
        log({'step': 0, 'tokens': tokens_seen, 'train_loss': None, 'lr': None, 'val_loss': val_loss,
             'val_bpb': val_bpb, 'eval_train_loss': losses['train_loss'], 'eval_train_bpb': losses['train_bpb'],
             'elapsed': time.time() - start_time})
        say_line(f"step 0: val loss {val_loss:.4f}{bpb_text(val_bpb)}, "
                 f"train loss {losses['train_loss']:.4f}")

    params = [p for p in raw_model.parameters() if p.requires_grad]
    interval_start, interval_tokens, interval_steps = time.time(), 0, 0
    tokens_per_sec = 0.0
    stop_reason = None
    while step < cfg['max_iters']:
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        loss_sum = torch.zeros((), device=device)
        for micro, sampler in enumerate(samplers):
            x, y = sampler.next_batch()
            if device_type == 'cuda':
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            else:
                x, y = x.to(device), y.to(device)
            # gradients are averaged across processes only on the last micro-step; syncing on every
            # one would be wasted communication
            last_micro = micro == len(samplers) - 1
            with nullcontext() if last_micro or not ddp else model.no_sync():
                with autocast:
                    _, loss = model(x, y, return_logits=False)
                scaler.scale(loss / len(samplers)).backward()
            loss_sum += loss.detach()
        # one small all-reduce a step: the mean loss over all processes, and whether any of them got a
        # signal or ran out of time (so that all of them take the same decisions below)
        timed_out = cfg['max_time'] > 0 and time.time() - start_time >= cfg['max_time']
        flags = torch.tensor([float(bool(stop_signal)), float(timed_out)], device=device)
        status = torch.cat([(loss_sum / len(samplers)).view(1), flags])
        if world_size > 1:
            torch.distributed.all_reduce(status)
        loss_total, signals, timeouts = status.tolist()  # one device-to-host copy, the step's one sync
        train_loss, signalled, timed_out = loss_total / world_size, signals > 0, timeouts > 0
        if not math.isfinite(train_loss):
            bar.close()
            fail(f"the training loss became {train_loss} at step {step + 1} (lr {lr:.3g}); stopped without "
                 f"saving, so {out_dir}/ckpt.pt still holds the last good checkpoint. Try a lower learning_rate, "
                 f"a longer warmup_iters, grad_clip, or dtype='bfloat16' instead of 'float16'")
        if cfg['grad_clip'] > 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg['grad_clip'])
        else:
            grad_norm = None
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        interval_tokens += tokens_per_step
        interval_steps += 1
        if signalled:
            stop_reason = f"stopped by {stop_signal[0] if stop_signal else 'a signal to another process'}"
        elif timed_out:
            stop_reason = f"max_time ({cfg['max_time']:g} s) reached"
        last = step >= cfg['max_iters'] or stop_reason is not None
        eval_now = (step % cfg['eval_interval'] == 0 or last) and not signalled  # a signal wants out quickly

        if step % cfg['log_interval'] == 0 or last or eval_now:
            elapsed = time.time() - interval_start
            tokens_per_sec = interval_tokens / max(elapsed, 1e-9)
            mfu = raw_model.estimate_mfu(tokens_per_sec / world_size, peak, block_size) if peak else None
            record = {'step': step, 'tokens': tokens_seen, 'train_loss': train_loss, 'lr': lr,
                      'grad_norm': grad_norm.item() if grad_norm is not None else None,
                      'tokens_per_sec': tokens_per_sec, 'mfu': mfu, 'memory_gb': memory_gb(device),
                      'elapsed': time.time() - start_time, 'val_loss': None, 'val_bpb': None}
            if bar.disable:
                left = (cfg['max_iters'] - step) * elapsed / interval_steps
                if cfg['max_time'] > 0:
                    left = min(left, cfg['max_time'] - (time.time() - start_time))
                say(f"step {step}/{cfg['max_iters']} | loss {train_loss:.4f} | lr {lr:.2e} | "
                    f"{tokens_per_sec:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu else "")
                    + f" | eta {max(0, left) / 60:.1f} min")
            interval_start, interval_tokens, interval_steps = time.time(), 0, 0
        else:
            record = None
        bar.update(1)
        bar.set_postfix_str(f"loss {train_loss:.4f} lr {lr:.2e} {tokens_per_sec:,.0f} tok/s", refresh=False)

        if eval_now:
            losses = run_eval()
            val_loss, val_bpb = losses['val_loss'], losses['val_bpb']
            if not math.isfinite(val_loss):
                bar.close()
                fail(f"the validation loss became {val_loss} at step {step}; stopped without saving")
            record.update(val_loss=val_loss, val_bpb=val_bpb, eval_train_loss=losses['train_loss'],
                          eval_train_bpb=losses['train_bpb'])
            saved = save(losses)
            say_line(f"step {step}: val loss {val_loss:.4f}{bpb_text(val_bpb)}, "
                     f"train loss {losses['train_loss']:.4f} | {saved}")
            interval_start = time.time()  # evaluation and saving are not training time
        elif signalled:
            save(None)
        if record is not None:
            log(record)
        if stop_reason:
            break
    bar.close()
    if master:
        log_file.close()
        if wandb_run is not None:
            wandb_run.finish()
    minutes = (time.time() - start_time) / 60
    if stop_reason:
        say(f"{stop_reason} at step {step}: saved {out_dir}/ckpt.pt ({minutes:.1f} min); continue with "
            f"--init_from=resume")
    else:
        say(f"done: {step} steps, {tokens_seen:,} tokens in {minutes:.1f} min; val loss {val_loss:.4f}"
            + bpb_text(val_bpb) + f"; best {best_val_loss:.4f}; checkpoint "
            f"{out_dir}/ckpt.pt")


if __name__ == '__main__':
    main(sys.argv[1:])
