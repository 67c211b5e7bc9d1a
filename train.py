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
import math
import os
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch

from mirim.atomic import link_atomic, save_atomic
from mirim.init_from import build_model
from mirim.out_dir import claim_out_dir, last_good, RunLog
from mirim.run import rng_state, set_rng_state
from mirim.common import (autocast, dtype_name, fail, memory_gb, peak_flops, peer_timeout, print0, start_processes, stop_signals, training_dtype)
from mirim.configurator import ConfigError, configure, print_config
from mirim.optim import get_lr, make_optimizer, OPTIMIZERS
from mirim.shards import BatchSampler, load_meta, ShardError
from mirim.tokenizer import load_tokenizer

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
# model: a preset from model.PRESETS, or 'auto'; any shape key set below replaces the preset's value
model = 'demo'                    # 'auto': the shape follows from depth, and the run's size from the data (plan.py)
depth = 4                         # model='auto': layers; width 64 x depth, heads of 64, kv heads half, MLP 8/3 width
tokens_per_param = 20.0           # model='auto': tokens to train on per parameter (Chinchilla's 20) ...
max_epochs = 4.0                  # ... but at most this many epochs of the train split
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
optimizer = 'adamw'               # 'adamw' | 'muon': Muon for the blocks' matrices, AdamW for the rest (optim.py)
learning_rate = 1e-3              # peak learning rate, reached after warmup_iters (with muon: embeddings, head, gains)
muon_lr = 0.02                    # optimizer='muon': peak learning rate of the blocks' matrices
muon_momentum = 0.95              # optimizer='muon': Nesterov momentum of the matrices
min_lr = 1e-4                     # the schedule ends here (every group ends at the same fraction of its peak)
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
ddp_timeout = 300.0               # seconds a process waits for the others (torchrun) before stopping with an error

DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and k != 'DEFAULTS'
            and isinstance(v, (int, float, bool, str, type(None)))}


def depth_dial(cfg, params, block_size, corpus_tokens):
    """model='auto': set cfg's max_iters and batch_size (per micro-batch) from the model's size and the
    corpus (plan.size_run), unless the config sets them (a value other than the default). -> the
    lines that say what was chosen and why."""
    from plan import human, size_run
    size = size_run(params, block_size, cfg['tokens_per_param'], corpus_tokens, cfg['max_epochs'])
    accumulation = cfg['gradient_accumulation_steps']
    lines = [f"depth dial: depth {cfg['depth']} -> {human(params)} parameters; train on {human(size['tokens'])} "
             f"tokens ({size['why']}) in steps of {size['batch_tokens']:,} tokens (a power of two leaving ~1000 steps, "
             f"at most 2^19)"]
    derived = {'batch_size': max(1, size['batch_tokens'] // (block_size * accumulation))}
    derived['max_iters'] = max(1, math.ceil(size['tokens'] / (derived['batch_size'] * block_size * accumulation)))
    for key, value in derived.items():
        if cfg[key] != DEFAULTS[key]:
            lines.append(f"depth dial: {key}={cfg[key]} as the config sets it (the dial's: {value})")
        else:
            cfg[key] = value
            lines.append(f"depth dial: {key}={value}")
    return lines


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model, sampler, iters, rank, world_size, device, amp):
    """Mean loss over `iters` batches that are the same at every call (the sampler is reset); under
    DDP each process takes every world_size-th batch and the sums are added up."""
    model.eval()
    sampler.reset()
    total = torch.zeros((), device=device)
    for i in range(iters):
        x, y = sampler.next_batch()  # every rank draws every batch, to stay in step
        if i % world_size != rank:
            continue
        with amp:
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
# set-up: config, processes, out_dir, data, model, optimizer

def check_config(c):
    checks = [
        (c.lr_schedule in ('cosine', 'wsd', 'constant'), "lr_schedule must be 'cosine', 'wsd' or 'constant'"),
        (c.model != 'auto' or (isinstance(c.depth, int) and c.depth >= 1), "model='auto' needs depth >= 1"),
        (c.tokens_per_param > 0 and c.max_epochs > 0, "tokens_per_param and max_epochs must be positive"),
        (c.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}"),
        (c.muon_lr >= 0 and 0 <= c.muon_momentum < 1, "muon_lr must not be negative, muon_momentum in [0, 1)"),
        (c.optimizer != 'muon' or c.learning_rate > 0, "optimizer='muon' needs learning_rate > 0 (the schedule is "
                                                       "a fraction of it)"),
        (c.batch_size >= 1, "batch_size must be at least 1"),
        (c.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1"),
        (c.max_iters >= 1, "max_iters must be at least 1"),
        (c.eval_interval >= 1 and c.eval_iters >= 1 and c.log_interval >= 1,
         "eval_interval, eval_iters and log_interval must be at least 1"),
        (c.block_size is None or (isinstance(c.block_size, int) and c.block_size >= 1),
         "block_size must be a positive integer (or None: the model's)"),
        (c.vocab_size is None or (isinstance(c.vocab_size, int) and c.vocab_size >= 1),
         "vocab_size must be a positive integer (or None: the data's)"),
        (0 <= c.wsd_decay_fraction <= 1, "wsd_decay_fraction must be between 0 and 1"),
        (c.learning_rate >= 0 and c.min_lr >= 0 and c.warmup_iters >= 0 and c.lr_decay_iters >= 0,
         "learning rates, warmup_iters and lr_decay_iters must not be negative"),
        (0 <= c.beta1 < 1 and 0 <= c.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
        (c.weight_decay >= 0, "weight_decay must not be negative"),
        (c.grad_clip >= 0, "grad_clip must not be negative (0 = no clipping)"),
        (c.max_time >= 0, "max_time must not be negative (0 = no limit)"),
        (c.ddp_timeout > 0, "ddp_timeout must be positive (seconds)"),
        (c.device_peak_flops >= 0, "device_peak_flops must not be negative (0 = look it up)"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)


def set_up(c, rank, world_size, device):
    """Everything the loop needs, in one namespace: this process's place (rank, world_size, device),
    data, samplers, model (raw, compiled, DDP-wrapped), optimizer, scaler, and the counters a
    checkpoint restores."""
    torch.manual_seed(c.seed + rank)  # dropout differs between ranks; the weights come from `seed` alone
    if device.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        meta = load_meta(c.data_dir)
        tokenizer = load_tokenizer(meta['tokenizer'], base_dir=c.data_dir)
    except (FileNotFoundError, ShardError, KeyError, ValueError) as e:
        fail(f"data {c.data_dir}: {e}")
    try:
        model, checkpoint = build_model(vars(c), meta, tokenizer, print0)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    config = model.config
    if meta['vocab_size'] > config.vocab_size:
        fail(f"the data in {c.data_dir} has a vocab of {meta['vocab_size']} tokens but the model only "
             f"{config.vocab_size} embeddings; use a model with vocab_size >= {meta['vocab_size']}")
    block_size = c.block_size or config.block_size
    if block_size > config.block_size:
        fail(f"block_size={block_size} is longer than the model's context ({config.block_size} positions)")
    if c.model == 'auto' and c.init_from in ('scratch', 'resume'):
        for line in depth_dial(vars(c), model.num_params(non_embedding=False), block_size,
                               meta['splits']['train']['tokens']):
            print0(line)

    # micro-batch j of every step comes from stream j (see the docstring); evaluation reads fixed
    # windows of each split, from a seed of their own
    local_steps = c.gradient_accumulation_steps // world_size
    try:
        samplers = [BatchSampler(c.data_dir, 'train', c.batch_size, block_size, seed=c.seed, rank=j,
                                 world_size=c.gradient_accumulation_steps)
                    for j in range(rank * local_steps, (rank + 1) * local_steps)]
        eval_samplers = {split: BatchSampler(c.data_dir, split, c.batch_size, block_size, seed=c.seed + 1)
                         for split in ('train', 'val')}
    except (FileNotFoundError, ShardError) as e:
        fail(str(e))

    try:
        dtype = training_dtype(c.dtype, device)
    except ValueError as e:
        fail(str(e))
    model.to(device)
    device_type = device.split(':')[0]
    optimizer = make_optimizer(model, c.optimizer, c.learning_rate, c.weight_decay, (c.beta1, c.beta2), device_type,
                               muon_lr=c.muon_lr, muon_momentum=c.muon_momentum)
    return SimpleNamespace(
        rank=rank, world_size=world_size, device=device, meta=meta, tokenizer=tokenizer, raw_model=model, model=model, eval_model=model, checkpoint=checkpoint,
        samplers=samplers, eval_samplers=eval_samplers, block_size=block_size, dtype=dtype,
        amp=autocast(device, dtype), optimizer=optimizer,
        scaler=torch.amp.GradScaler(device_type, enabled=dtype == torch.float16),
        tokens_per_step=c.batch_size * block_size * c.gradient_accumulation_steps,
        step=0, tokens_seen=0, best_val_loss=float('inf'), val_loss=None, val_bpb=None, elapsed_before=0.0)


def restore(run, c):
    """Continue a run from its checkpoint: optimizer, scaler, data position, counters, random state."""
    checkpoint, run.checkpoint = run.checkpoint, None  # free the memory once restored
    trained_with = checkpoint['config'].get('optimizer', 'adamw')
    if trained_with != c.optimizer:
        fail(f"{c.out_dir}/ckpt.pt was trained with optimizer={trained_with!r}; resume with --optimizer={trained_with}, or "
             f"fine-tune with --init_from={c.out_dir} --out_dir=... (a fresh {c.optimizer} optimizer)")
    base_lrs = [group['base_lr'] for group in run.optimizer.param_groups]
    run.optimizer.load_state_dict(checkpoint['optimizer'])
    for group, base_lr in zip(run.optimizer.param_groups, base_lrs):  # this config's rates, not the saved ones
        group['base_lr'] = base_lr
    run.scaler.load_state_dict(checkpoint['scaler'])
    for sampler in run.samplers:  # every stream has drawn as many batches as stream 0
        sampler.load_state_dict(checkpoint['sampler'])
    run.step, run.tokens_seen = checkpoint['step'], checkpoint['tokens_seen']
    run.best_val_loss, run.val_loss, run.val_bpb = (checkpoint['best_val_loss'], checkpoint['val_loss'],
                                                    checkpoint['val_bpb'])
    run.elapsed_before = checkpoint.get('elapsed', 0.0)
    rng = checkpoint['rng']
    set_rng_state(rng[run.rank] if run.rank < len(rng) else rng[0])
    before = checkpoint['config']
    changed = [f"{k}: {before[k]!r} -> {v!r}" for k, v in vars(c).items()
               if k in before and before[k] != v and k != 'init_from']
    print0(f"resuming {c.out_dir}/ckpt.pt at step {run.step} ({run.tokens_seen:,} tokens seen)"
        + (f"; changed since: {', '.join(changed)}" if changed else ""))


def wrap_model(run, c, ddp):
    if c.compile:
        print0("compiling the model (torch.compile)...")
        run.model = run.eval_model = torch.compile(run.raw_model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        # no buffer sync before each forward: the only buffers are RoPE tables, identical everywhere
        run.model = DistributedDataParallel(run.model, device_ids=[run.device] if run.device.startswith('cuda') else None,
                                            forward_sync_buffers=False)


def describe(run, c):
    say = print0
    config, splits = run.raw_model.config, run.meta['splits']
    say("config:")
    print_config(vars(c), say)
    say(f"model: {run.raw_model.num_params() / 1e6:.2f}M parameters without embeddings "
        f"({run.raw_model.num_params(non_embedding=False) / 1e6:.2f}M in all): {config.n_layer} layers, "
        f"width {config.n_embd}, {config.n_head} heads ({config.n_kv_head} kv), vocab {config.vocab_size}, "
        f"context {config.block_size}")
    say(f"data: {c.data_dir}: {splits['train']['tokens']:,} train tokens, {splits['val']['tokens']:,} val tokens; "
        f"tokenizer {run.tokenizer.kind}, vocab {run.meta['vocab_size']}")
    total_tokens = run.tokens_per_step * c.max_iters
    say(f"tokens per step: {c.batch_size} x {run.block_size} x {c.gradient_accumulation_steps} = "
        f"{run.tokens_per_step:,}; {c.max_iters} steps = {total_tokens:,} tokens "
        f"({total_tokens / splits['train']['tokens']:.1f} epochs)")
    say(f"device {run.device}, dtype {dtype_name(run.dtype)}, {run.world_size} process"
        f"{'es' if run.world_size > 1 else ''}, compile {'on' if c.compile else 'off'}")


# -----------------------------------------------------------------------------
# logging and saving

def save(run, c, val_losses, elapsed):
    """Write ckpt.pt (and best.pt when validation improved). Every rank calls this (to hand rank 0
    its random state); only rank 0 writes. Weights that are no longer finite are never saved."""
    states = [None] * run.world_size
    if run.world_size > 1:
        torch.distributed.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if not all(torch.isfinite(p).all() for p in run.raw_model.parameters()):
        fail(f"the weights are no longer finite at step {run.step} (the training diverged); stopped without "
             f"saving, so {last_good(c.out_dir)}. Try a lower learning_rate, a longer warmup_iters or grad_clip")
    improved = val_losses is not None and val_losses['val_loss'] < run.best_val_loss
    if improved:
        run.best_val_loss = val_losses['val_loss']
    if run.rank != 0:
        return ''
    ckpt = {'model': run.raw_model.state_dict(), 'model_config': dataclasses.asdict(run.raw_model.config),
            'config': vars(c), 'tokenizer': run.tokenizer.to_dict(), 'step': run.step,
            'tokens_seen': run.tokens_seen, 'best_val_loss': run.best_val_loss, 'val_loss': run.val_loss,
            'val_bpb': run.val_bpb, 'optimizer': run.optimizer.state_dict(), 'scaler': run.scaler.state_dict(),
            'sampler': run.samplers[0].state_dict(), 'rng': states, 'data_dir': c.data_dir, 'elapsed': elapsed}
    path = os.path.join(c.out_dir, 'ckpt.pt')
    try:
        save_atomic(ckpt, path)
        if improved:
            link_atomic(path, os.path.join(c.out_dir, 'best.pt'))
    except (OSError, RuntimeError) as e:  # a full disk shows up as either
        fail(f"cannot write {path}: {e}; {last_good(c.out_dir)} (free some space, then --init_from=resume)")
    return 'saved ckpt.pt' + (' and best.pt' if improved else '')


# -----------------------------------------------------------------------------
# the loop

def train_loop(run, c, signals, start_time, log):
    """Train from run.step to max_iters, evaluating, logging and saving on the way. -> (why it
    stopped early (a signal, max_time) or None when the schedule was completed, seconds the whole
    run has taken so far)."""
    from tqdm import tqdm
    rank, world_size, device = run.rank, run.world_size, run.device
    ddp = isinstance(run.model, torch.nn.parallel.DistributedDataParallel)
    model, optimizer, scaler = run.model, run.optimizer, run.scaler
    peak = c.device_peak_flops or peak_flops(device, run.dtype)
    params = [p for p in run.raw_model.parameters() if p.requires_grad]
    bar = tqdm(total=c.max_iters, initial=run.step, unit='step', dynamic_ncols=True,
               disable=not (rank == 0 and sys.stderr.isatty()))
    say_line = bar.write if not bar.disable else print0
    elapsed = lambda: run.elapsed_before + time.time() - start_time  # noqa: E731  (over all sessions of the run)

    def run_eval():
        losses = {}
        for split, sampler in run.eval_samplers.items():
            loss = evaluate(run.eval_model, sampler, c.eval_iters, rank, world_size, device, run.amp)
            losses[f'{split}_loss'], losses[f'{split}_bpb'] = loss, bits_per_byte(loss, run.meta['splits'][split])
        if not math.isfinite(losses['val_loss']):
            bar.close()
            fail(f"the validation loss became {losses['val_loss']} at step {run.step}; stopped without saving, "
                 f"so {last_good(c.out_dir)}")
        run.val_loss, run.val_bpb = losses['val_loss'], losses['val_bpb']
        return losses

    if run.step == 0:  # where the run starts from
        losses = run_eval()
        log({'step': 0, 'tokens': 0, 'train_loss': None, 'lr': None, 'val_loss': run.val_loss,
             'val_bpb': run.val_bpb, 'eval_train_loss': losses['train_loss'], 'eval_train_bpb': losses['train_bpb'],
             'elapsed': elapsed()})
        say_line(f"step 0: val loss {run.val_loss:.4f}{bpb_text(run.val_bpb)}, train loss {losses['train_loss']:.4f}")

    interval_start, interval_tokens, interval_steps = time.time(), 0, 0
    tokens_per_sec = None
    stop_reason = None
    while run.step < c.max_iters:
        lr = get_lr(run.step, c)
        for group in optimizer.param_groups:  # every group follows the schedule, from its own peak
            group['lr'] = lr if group['base_lr'] == c.learning_rate else group['base_lr'] * lr / c.learning_rate
        loss_sum = torch.zeros((), device=device)
        for micro, sampler in enumerate(run.samplers):
            x, y = sampler.next_batch()
            if device.startswith('cuda'):
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            else:
                x, y = x.to(device), y.to(device)
            # gradients are averaged across processes only on the last micro-step; syncing on every
            # one would be wasted communication
            last_micro = micro == len(run.samplers) - 1
            with nullcontext() if last_micro or not ddp else model.no_sync():
                with run.amp:
                    _, loss = model(x, y, return_logits=False)
                scaler.scale(loss / len(run.samplers)).backward()
            loss_sum += loss.detach()
        # one small all-reduce a step: the mean loss over all processes, and whether any of them got a
        # signal or ran out of time (so that all of them take the same decisions below)
        timed_out = c.max_time > 0 and time.time() - start_time >= c.max_time
        status = torch.cat([(loss_sum / len(run.samplers)).view(1),
                            torch.tensor([float(bool(signals)), float(timed_out)], device=device)])
        if world_size > 1:
            torch.distributed.all_reduce(status)
        loss_total, signalled, timed_out = status.tolist()  # one device-to-host copy, the step's one sync
        train_loss = loss_total / world_size
        if not math.isfinite(train_loss):
            bar.close()
            fail(f"the training loss became {train_loss} at step {run.step + 1} (lr {lr:.3g}); stopped without "
                 f"saving, so {last_good(c.out_dir)}. Try a lower learning_rate, a longer warmup_iters, grad_clip, or "
                 f"dtype='bfloat16' instead of 'float16'")
        grad_norm = None
        if c.grad_clip > 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        run.step += 1
        run.tokens_seen += run.tokens_per_step
        interval_tokens += run.tokens_per_step
        interval_steps += 1
        if signalled:
            stop_reason = f"stopped by {signals[0] if signals else 'a signal to another process'}"
        elif timed_out:
            stop_reason = f"max_time ({c.max_time:g} s) reached"
        last = run.step >= c.max_iters or stop_reason is not None
        eval_now = (run.step % c.eval_interval == 0 or last) and not signalled  # a signal wants out quickly

        record = None
        if run.step % c.log_interval == 0 or last or eval_now:
            seconds = time.time() - interval_start
            tokens_per_sec = interval_tokens / max(seconds, 1e-9)
            mfu = run.raw_model.estimate_mfu(tokens_per_sec / world_size, peak, run.block_size) if peak else None
            record = {'step': run.step, 'tokens': run.tokens_seen, 'train_loss': train_loss, 'lr': lr,
                      'grad_norm': grad_norm.item() if grad_norm is not None else None, 'tokens_per_sec': tokens_per_sec, 'mfu': mfu,
                      'memory_gb': memory_gb(device), 'elapsed': elapsed(), 'val_loss': None, 'val_bpb': None}
            if bar.disable:
                left = (c.max_iters - run.step) * seconds / interval_steps
                if c.max_time > 0:
                    left = min(left, c.max_time - (time.time() - start_time))
                print0(f"step {run.step}/{c.max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | "
                    f"{tokens_per_sec:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu else "")
                    + f" | eta {max(0, left) / 60:.1f} min")
            interval_start, interval_tokens, interval_steps = time.time(), 0, 0
        bar.update(1)
        speed = f" {tokens_per_sec:,.0f} tok/s" if tokens_per_sec is not None else ""
        bar.set_postfix_str(f"loss {train_loss:.4f} lr {lr:.2e}{speed}", refresh=False)

        if eval_now:
            losses = run_eval()
            record.update(val_loss=run.val_loss, val_bpb=run.val_bpb, eval_train_loss=losses['train_loss'],
                          eval_train_bpb=losses['train_bpb'])
            log(record)  # before the save: a resume drops log lines past its checkpoint, never misses one
            saved = save(run, c, losses, elapsed())
            say_line(f"step {run.step}: val loss {run.val_loss:.4f}{bpb_text(run.val_bpb)}, "
                     f"train loss {losses['train_loss']:.4f} | {saved}")
            interval_start = time.time()  # evaluation and saving are not training time
        else:
            if record is not None:
                log(record)
            if signalled:
                save(run, c, None, elapsed())
        if stop_reason:
            break
    bar.close()
    return stop_reason, elapsed()


# -----------------------------------------------------------------------------
# main

def main(argv):
    start_time = time.time()
    try:
        c = SimpleNamespace(**configure(DEFAULTS, argv, help_source=__file__))  # --help reads the comments above
    except ConfigError as e:
        fail(str(e))
    check_config(c)

    ddp, rank, world_size, device = start_processes(c.device, c.gradient_accumulation_steps, c.ddp_timeout)
    try:
        lock = claim_out_dir(c.out_dir, resume=c.init_from == 'resume') if rank == 0 else None
    except ValueError as e:
        fail(str(e))
    try:
        run = set_up(c, rank, world_size, device)
        if run.checkpoint is not None:
            restore(run, c)
            if run.step >= c.max_iters:
                print0(f"nothing to do: the checkpoint is at step {run.step}, max_iters is {c.max_iters}")
                return
        wrap_model(run, c, ddp)
        describe(run, c)
        log = RunLog(c, run.step, rank)
        steps_before = run.step
        try:
            with stop_signals() as signals:
                stop_reason, elapsed = train_loop(run, c, signals, start_time, log)
        except ShardError as e:  # found while reading batches
            fail(str(e))
        except RuntimeError as e:
            if ddp and peer_timeout(e, rank, c.ddp_timeout):
                fail(peer_timeout(e, rank, c.ddp_timeout))
            raise
        finally:
            log.close()
        minutes = (time.time() - start_time) / 60
        if stop_reason:
            print0(f"{stop_reason} at step {run.step}: saved {c.out_dir}/ckpt.pt ({minutes:.1f} min); continue with "
                f"--init_from=resume")
        else:
            session = f" (this session: {run.step - steps_before} steps, {minutes:.1f} min)" if steps_before else ""
            print0(f"done: {run.step} steps, {run.tokens_seen:,} tokens in {elapsed / 60:.1f} min{session}; "
                f"val loss {run.val_loss:.4f}" + bpb_text(run.val_bpb) + f"; best {run.best_val_loss:.4f}; "
                f"checkpoint {c.out_dir}/ckpt.pt")
        if ddp:  # every process reaches the end before any tears the group down (gloo aborts a process
            torch.distributed.barrier()  # whose peer closes while rank 0 is still saving)
    finally:
        if lock is not None:
            os.close(lock)
        if ddp:
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1:])
