"""
The run skeleton every training command shares: train.py (pre-training, SFT), dpo.py (preference
tuning) and classify.py (a classifier head) describe what is their own in a Task (their data, one
micro-batch's loss, their evaluation); train() does the rest, the same way for each:

- claims the out_dir (a lock; a new run never replaces a previous run's checkpoints) and starts the
  processes: one, or many under torchrun (DDP, or FSDP2 with parallel='fsdp': mirim/fsdp.py; nccl on GPUs,
  gloo on CPUs);
- builds the model the run starts from (scratch, resume, or fine-tuning a mirim checkpoint or a
  Hugging Face folder, with every tokenizer check: mirim/init_from.py) and its optimizer (AdamW, or
  Muon for the blocks' matrices: mirim/optim.py);
- resumes exactly: model, optimizer, scaler, step, the task's data position, each process's random state;
- steps: the learning-rate schedule for every parameter group from its own peak, gradient accumulation
  (gradients synced on the last micro-step only), clipping, float16 loss scaling, and one all-reduce a
  step for the loss and the stop decision, so a signal or max_time on any process stops all of them
  after the same step;
- evaluates every eval_interval steps, logs (log.jsonl, wandb), saves ckpt.pt atomically and best.pt when
  the validation loss improved, and never saves weights that are no longer finite;
- ends with a summary line and tears the processes down in order.
"""
import dataclasses
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch

from mirim.atomic import link_atomic, save_atomic
from mirim.checkpoint import FORMAT_VERSION
from mirim.common import (autocast, dtype_name, fail, memory_gb, peak_flops, peer_timeout, print0, start_processes,
                          stop_signals, training_dtype)
from mirim.configurator import ConfigError, configure, print_config
from mirim.emissions import Meter
from mirim.init_from import build_model
from mirim.optim import NS_DTYPES, OPTIMIZERS, get_lr, make_optimizer
from mirim.out_dir import RunLog, claim_out_dir, last_good
from mirim.shards import ShardError, load_meta
from mirim.tokenizer import load_tokenizer
from mirim.train_config import CHOICES

AUTO_COMPILE_MINUTES = 10  # compile='auto' compiles when the eager steps left would take longer (README: compile)


class Task:
    """What a training command adds to the skeleton. `run` (a namespace) carries the state: rank,
    world_size, device, meta, tokenizer, raw_model / model (DDP-wrapped) / eval_model (compiled),
    amp, optimizer, scaler, step, tokens_seen, val_loss, best_val_loss..."""
    name = 'train.py'
    metrics = ('loss',)          # the sums micro_step returns, logged as means over units_per_step
    hint = "Try a lower learning_rate, a longer warmup_iters or grad_clip"  # when training diverges

    def check_config(self, c):
        """Fail on the command's own settings (the shared ones are checked by check_run_config)."""

    def load_start(self, c):
        """-> (model on the CPU in float32, tokenizer, the data's meta.json or None, the checkpoint resumed or
        None). By default the data in c.data_dir (token shards) and the model init_from names, with every
        check that the two agree (mirim/init_from.py)."""
        try:
            meta = load_meta(c.data_dir)
            tokenizer = load_tokenizer(meta['tokenizer'], base_dir=c.data_dir)
        except (FileNotFoundError, ShardError, KeyError, ValueError) as e:
            fail(f"data {c.data_dir}: {e}")
        try:
            model, checkpoint = build_model(vars(c), meta, tokenizer, print0)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        if meta['vocab_size'] > model.config.vocab_size:
            fail(f"the data in {c.data_dir} has a vocab of {meta['vocab_size']} tokens but the model only "
                 f"{model.config.vocab_size} embeddings; use a model with vocab_size >= {meta['vocab_size']}")
        return model, tokenizer, meta, checkpoint

    def set_up(self, run, c):
        """The data (batches, evaluation sets) and checks of the model against it; the model is built and on
        its device."""

    def optimizer_groups(self, run, c):
        """More AdamW parameter groups, each at its own peak 'lr' (e.g. a classifier's new head)."""
        return []

    def micro_step(self, run, c, j):
        """-> (the loss to back-propagate, the sums of `metrics` over the micro-batch, a 1-d tensor on the device)
        for micro-batch j of the step, numbered over all processes (j < gradient_accumulation_steps): the
        data of micro-batch j must not depend on which process runs it, so N processes match one."""
        raise NotImplementedError

    def units_per_step(self, run, c):
        """What the metric sums of one step (all micro-batches, all processes) are divided by."""
        return c.gradient_accumulation_steps

    def evaluate(self, run, c):
        """-> {'val_loss': ..., anything else to log}, the same on every process."""
        raise NotImplementedError

    def progress(self, run):
        """What a log record says of how far the run is, e.g. {'tokens': run.tokens_seen}."""
        return {}

    def step_text(self, metrics):
        return f"loss {metrics[self.metrics[0]]:.4f}"

    def eval_text(self, found):
        return f"val loss {found['val_loss']:.4f}"

    def describe(self, run, c):
        """Lines that describe the data and the batch."""
        return []

    def restore(self, run, c, checkpoint):
        """The task's own part of a resume (its data position); may refuse a checkpoint it cannot continue."""

    def checkpoint_state(self, run, c):
        """The task's own entries of ckpt.pt."""
        return {}

    def finish(self, run, c):
        """After a run that completed its schedule, on rank 0 (e.g. a final test score)."""


class ExampleOrder:
    """Position p of the training stream is example perm_e[p % N] of epoch e = p // N, perm_e a permutation
    seeded by (seed, e). Micro-batch j of step s takes positions (s * accumulation + j) * batch_size on:
    a function of the step alone, so resuming needs no state and any split among processes draws the same."""

    def __init__(self, n, seed):
        self.n, self.seed, self.perms = n, seed, {}

    def positions(self, start, count):
        out = []
        for p in range(start, start + count):
            epoch = p // self.n
            if epoch not in self.perms:
                self.perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
            out.append(int(self.perms[epoch][p % self.n]))
        return out

    def micro_batch(self, step, j, c):
        return self.positions((step * c.gradient_accumulation_steps + j) * c.batch_size, c.batch_size)


def sharded(c):
    """parallel='fsdp': FSDP2 under torchrun, and sharded checkpoints (mirim/fsdp.py)."""
    return getattr(c, 'parallel', 'ddp') == 'fsdp'


def checkpoint_name(c):
    return 'ckpt.dcp' if sharded(c) else 'ckpt.pt'


def check_run_config(c):
    """The settings every run has, each error naming its key; a command checks its own in Task.check_config."""
    for key in ('batch_size', 'gradient_accumulation_steps', 'max_iters', 'eval_interval', 'log_interval',
                'muon_ns_steps'):
        if getattr(c, key) < 1:
            fail(f"{key} must be at least 1")
    for key in ('learning_rate', 'min_lr', 'warmup_iters', 'lr_decay_iters', 'muon_lr', 'weight_decay', 'grad_clip',
                'max_time'):
        if getattr(c, key) < 0:
            fail(f"{key} must not be negative" + (" (0 = off)" if key in ('grad_clip', 'max_time') else ""))
    for key in ('beta1', 'beta2', 'muon_momentum', 'dropout'):
        if not 0 <= getattr(c, key) < 1:
            fail(f"{key} must be in [0, 1)")
    checks = [
        (c.lr_schedule in ('cosine', 'linear', 'wsd', 'constant'),
         "lr_schedule must be 'cosine', 'linear', 'wsd' or 'constant'"),
        (c.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}"),
        (c.muon_ns_dtype in NS_DTYPES, "muon_ns_dtype must be 'auto', 'float32' or 'bfloat16'"),
        (c.optimizer != 'muon' or c.learning_rate > 0, "optimizer='muon' needs learning_rate > 0 (the schedule is "
                                                       "a fraction of it)"),
        (0 <= c.wsd_decay_fraction <= 1, "wsd_decay_fraction must be between 0 and 1"),
        (c.ddp_timeout > 0, "ddp_timeout must be positive (seconds)"),
        (0 <= c.seed < 2 ** 32, "seed must be in [0, 2**32): the random generators of every library take it"),
        (getattr(c, 'parallel', 'ddp') in ('ddp', 'fsdp'), "parallel must be 'ddp' or 'fsdp'"),
        (not sharded(c) or c.optimizer != 'muon', "optimizer='muon' does not run with parallel='fsdp' yet (its Newton-Schulz "
                                                  "step needs each whole matrix, FSDP keeps 1/N of its rows): use "
                                                  "parallel='ddp' or optimizer='adamw'"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)


# -----------------------------------------------------------------------------
# set-up, resume, save

def set_up(c, task, rank, world_size, device):
    """Everything the loop needs, in one namespace: this process's place, the tokenizer, the model (and
    the checkpoint it resumes, if any), the task's data, the optimizer and the counters."""
    torch.manual_seed(c.seed + rank)  # dropout differs between ranks; the weights come from `seed` alone
    if device.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model, tokenizer, meta, checkpoint = task.load_start(c)
    try:
        dtype = training_dtype(c.dtype, device)
    except ValueError as e:
        fail(str(e))
    run = SimpleNamespace(
        rank=rank, world_size=world_size, device=device, meta=meta, tokenizer=tokenizer, raw_model=model.to(device),
        model=model, eval_model=model, checkpoint=checkpoint, dtype=dtype, amp=autocast(device, dtype),
        scaler=torch.amp.GradScaler(device.split(':')[0], enabled=dtype == torch.float16),
        tokens_per_step=0, step=0, tokens_seen=0, best_val_loss=float('inf'), val_loss=None, val_bpb=None,
        elapsed_before=0.0)
    task.set_up(run, c)
    if getattr(c, 'activation_checkpointing', False) or (sharded(c) and world_size > 1):
        from mirim.fsdp import checkpoint_blocks, shard_model
        if getattr(c, 'activation_checkpointing', False):
            checkpoint_blocks(llama(model))
        if sharded(c) and world_size > 1:
            if dtype == torch.float16:
                fail("parallel='fsdp' trains in bfloat16 or float32, not float16 (its loss scaling is not sharded): "
                     "set dtype='bfloat16' or 'float32'")
            shard_model(model, llama(model), device, dtype)  # before the optimizer: it takes the sharded parameters
    run.optimizer = make_optimizer(model, c.optimizer, c.learning_rate, c.weight_decay, (c.beta1, c.beta2),
                                   device.split(':')[0], muon_lr=c.muon_lr, muon_momentum=c.muon_momentum,
                                   ns_steps=c.muon_ns_steps,
                                   ns_dtype=c.muon_ns_dtype,
                                   extra_groups=task.optimizer_groups(run, c))
    return run


def rng_state():
    """This process's random states as plain tensors, lists and ints (safe for weights_only loading)."""
    import numpy as np
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {'torch': torch.get_rng_state(), 'numpy': [np_state[0], np_state[1].tolist(), *np_state[2:]],
             'python': [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    import numpy as np
    torch.set_rng_state(state['torch'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def restore(run, c, task):
    """Continue a run from its checkpoint: optimizer, scaler, the task's data position, counters, random state."""
    checkpoint, run.checkpoint = run.checkpoint, None  # free the memory once restored
    # which command wrote it (checkpoints from before the 'command' entry: told by their own entries)
    made_by = checkpoint.get('command') or ('dpo.py' if 'dpo' in checkpoint else
                                           'classify.py' if 'head' in checkpoint else 'train.py')
    if made_by != task.name:
        fail(f"{c.out_dir}/{checkpoint_name(c)} was written by {made_by}, not {task.name}: resume it with {made_by}, or start "
             f"{task.name} from it with --init_from={c.out_dir} and another --out_dir")
    task.restore(run, c, checkpoint)
    trained_with = checkpoint['config'].get('optimizer', 'adamw')
    if trained_with != c.optimizer:
        fail(f"{c.out_dir}/{checkpoint_name(c)} was trained with optimizer={trained_with!r}; resume with --optimizer={trained_with}, or "
             f"fine-tune with --init_from={c.out_dir} --out_dir=... (a fresh {c.optimizer} optimizer)")
    base_lrs = [group['base_lr'] for group in run.optimizer.param_groups]
    if 'sharded' in checkpoint:  # each process reads its part (mirim/fsdp.py)
        from mirim.fsdp import load_sharded_optimizer
        load_sharded_optimizer(run.raw_model, run.optimizer, checkpoint['sharded'])
    else:
        run.optimizer.load_state_dict(checkpoint['optimizer'])
    for group, base_lr in zip(run.optimizer.param_groups, base_lrs):  # this config's rates, not the saved ones
        group['base_lr'] = base_lr
    run.scaler.load_state_dict(checkpoint['scaler'])
    run.step, run.tokens_seen = checkpoint['step'], checkpoint.get('tokens_seen', 0)
    run.best_val_loss, run.val_loss, run.val_bpb = (checkpoint['best_val_loss'], checkpoint['val_loss'],
                                                    checkpoint.get('val_bpb'))
    run.elapsed_before = checkpoint.get('elapsed', 0.0)
    rng = checkpoint['rng']
    set_rng_state(rng[run.rank] if run.rank < len(rng) else rng[0])
    before = checkpoint['config']
    changed = [f"{k}: {before[k]!r} -> {v!r}" for k, v in vars(c).items()
               if k in before and before[k] != v and k != 'init_from']
    print0(f"resuming {c.out_dir}/{checkpoint_name(c)} at step {run.step}" + (f" ({run.tokens_seen:,} tokens seen)" if run.tokens_seen
                                                                   else "")
           + (f"; changed since: {', '.join(changed)}" if changed else ""))


def eager_step_seconds(run, c, repeats=2):
    """Seconds of one eager forward + backward of a micro-batch (batch_size x block_size random tokens, after
    one untimed pass), the slowest process's; the RNG and the gradients are left as they were."""
    model, rng = llama(run.raw_model), rng_state()
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(model.config.vocab_size, (c.batch_size, run.block_size + 1), generator=generator).to(run.device)
    times = []
    for _ in range(repeats + 1):
        sync(run.device)
        start = time.perf_counter()
        with run.amp:
            _, loss = model(x[:, :-1], x[:, 1:], return_logits=False)
        loss.backward()
        sync(run.device)
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    set_rng_state(rng)
    seconds = torch.tensor([min(times[1:])], device=run.device)
    if run.world_size > 1:
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    return seconds.item()


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def compile_wanted(run, c):
    """c.compile True or False as it says; 'auto': True when the forward + backward passes left in the run
    would take over AUTO_COMPILE_MINUTES eagerly (timed at the start). A first compile cost 22-36 s and paid
    itself back after 3-5 minutes of eager training on a 2-core CPU (README: compile), so 10 leaves a margin."""
    if c.compile != 'auto':
        return bool(c.compile)
    seconds = eager_step_seconds(run, c)
    micro_batches = (c.max_iters - run.step) * (c.gradient_accumulation_steps // run.world_size)
    minutes = seconds * micro_batches / 60
    wanted = minutes > AUTO_COMPILE_MINUTES
    print0(f"compile='auto': {micro_batches:,} forward + backward passes left at {seconds:.3f} s each eagerly = "
           f"{minutes:.1f} min, {'over' if wanted else 'under'} {AUTO_COMPILE_MINUTES} -> compile {'on' if wanted else 'off'}")
    return wanted


def wrap_model(run, c, ddp):
    run.compiled = compile_wanted(run, c) if hasattr(c, 'compile') else False
    if run.compiled:
        print0("compiling the model (torch.compile)...")
        run.model = run.eval_model = torch.compile(run.raw_model)
    if ddp and not sharded(c):  # FSDP: the model is sharded already (set_up)
        from torch.nn.parallel import DistributedDataParallel
        # no buffer sync before each forward: the only buffers are RoPE tables, identical everywhere
        run.model = DistributedDataParallel(run.model, device_ids=[run.device] if run.device.startswith('cuda') else None,
                                            forward_sync_buffers=False)


def llama(model):
    """The Llama a run trains: the model itself, or the one a wrapper holds as .backbone (a classifier)."""
    return getattr(model, 'backbone', model)


def describe(run, c, task):
    config = llama(run.raw_model).config
    print0("config:")
    print_config(vars(c), print0)
    print0(f"model: {llama(run.raw_model).num_params() / 1e6:.2f}M parameters without embeddings "
           f"({llama(run.raw_model).num_params(non_embedding=False) / 1e6:.2f}M in all): {config.n_layer} layers, "
           f"width {config.n_embd}, {config.n_head} heads ({config.n_kv_head} kv), vocab {config.vocab_size}, "
           f"context {config.block_size}")
    for line in task.describe(run, c):
        print0(line)
    print0(f"device {run.device}, dtype {dtype_name(run.dtype)}, {run.world_size} process"
           f"{'es' if run.world_size > 1 else ''}{' (FSDP2)' if sharded(c) and run.world_size > 1 else ''}, optimizer {c.optimizer}, compile "
           f"{'on' if run.compiled else 'off'}")


def save(run, c, task, improved, elapsed):
    """Write ckpt.pt (and best.pt when validation improved). Every rank calls this (to hand rank 0
    its random state); only rank 0 writes. Weights that are no longer finite are never saved."""
    states = [None] * run.world_size
    if run.world_size > 1:
        torch.distributed.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    from mirim.fsdp import weights_finite
    if not weights_finite(run.raw_model, run.world_size):  # FSDP: each process checks its part
        fail(f"the weights are no longer finite at step {run.step} (the training diverged); stopped without "
             f"saving, so {last_good(c.out_dir)}. {task.hint}")
    if run.rank != 0 and not sharded(c):
        return ''
    entries = {'model_config': dataclasses.asdict(llama(run.raw_model).config),
               'config': vars(c), 'tokenizer': run.tokenizer.to_dict(), 'step': run.step,
               'tokens_seen': run.tokens_seen, 'best_val_loss': run.best_val_loss, 'val_loss': run.val_loss,
               'val_bpb': run.val_bpb, 'scaler': run.scaler.state_dict(), 'rng': states,
               'data_dir': getattr(c, 'data_dir', None), 'elapsed': elapsed, 'command': task.name,
               'format_version': FORMAT_VERSION, **task.checkpoint_state(run, c)}
    path = os.path.join(c.out_dir, checkpoint_name(c))
    try:
        if sharded(c):  # every process writes its part (mirim/fsdp.py)
            from mirim.fsdp import save_sharded
            save_sharded(run.raw_model, run.optimizer, entries, c.out_dir, run.step, improved, run.rank)
        else:
            save_atomic({'model': llama(run.raw_model).state_dict(), 'optimizer': run.optimizer.state_dict(),
                         **entries}, path)
            if improved:
                link_atomic(path, os.path.join(c.out_dir, 'best.pt'))
    except (OSError, RuntimeError) as e:  # a full disk shows up as either
        fail(f"cannot write {path}: {e}; {last_good(c.out_dir)} (free some space, then --init_from=resume)")
    name = os.path.basename(path)
    return f'saved {name}' + (f" and best{name[4:]}" if improved else '')


# -----------------------------------------------------------------------------
# the loop

@torch.no_grad()
def sum_over_batches(run, count, batch_size, width, batch_sums):
    """The sum of batch_sums(start, stop) (a 1-d tensor of `width` on the device) over the batches [start, stop)
    of `count` items, the model in eval mode: each process takes every world_size-th batch, and the sums of
    all processes are added up, so every process gets the same total."""
    total = torch.zeros(width, device=run.device)
    run.raw_model.eval()
    starts = list(range(0, count, batch_size))
    # every process runs as many batches (FSDP's forward needs all of them): the last round's extra ones
    # repeat the last batch and are not counted
    for n in range(-(-len(starts) // run.world_size) * run.world_size):
        if n % run.world_size == run.rank:
            start = starts[min(n, len(starts) - 1)]
            sums = batch_sums(start, min(start + batch_size, count))
            if n < len(starts):
                total += sums
    if run.world_size > 1:
        torch.distributed.all_reduce(total)
    run.raw_model.train()
    return total


def evaluate(run, c, task):
    found = task.evaluate(run, c)
    if not math.isfinite(found['val_loss']):
        fail(f"the validation loss became {found['val_loss']} at step {run.step}; stopped without saving, "
             f"so {last_good(c.out_dir)}")
    run.val_loss, run.val_bpb = found['val_loss'], found.get('val_bpb')
    return found


def train_loop(run, c, task, signals, start_time, log):
    """Train from run.step to max_iters, evaluating, logging and saving on the way. -> (why it
    stopped early (a signal, max_time) or None when the schedule was completed, seconds the whole
    run has taken so far)."""
    from tqdm import tqdm
    ddp = isinstance(run.model, torch.nn.parallel.DistributedDataParallel)
    model, optimizer, scaler, device = run.model, run.optimizer, run.scaler, run.device
    local_steps = c.gradient_accumulation_steps // run.world_size
    peak = getattr(c, 'device_peak_flops', 0) or peak_flops(device, run.dtype)
    params = [p for p in run.raw_model.parameters() if p.requires_grad]
    bar = tqdm(total=c.max_iters, initial=run.step, unit='step', dynamic_ncols=True,
               disable=not (run.rank == 0 and sys.stderr.isatty()))
    say = bar.write if not bar.disable else print0
    elapsed = lambda: run.elapsed_before + time.time() - start_time  # noqa: E731  (over all sessions of the run)

    if run.step == 0:  # where the run starts from
        found = evaluate(run, c, task)
        log({'step': 0, **task.progress(run), **dict.fromkeys(task.metrics), 'lr': None, **found, 'elapsed': elapsed()})
        say(f"step 0: {task.eval_text(found)}")

    interval_start, interval_tokens, interval_steps = time.time(), 0, 0
    tokens_per_sec = None
    stop_reason = None
    while run.step < c.max_iters:
        lr = get_lr(run.step, c)
        for group in optimizer.param_groups:  # every group follows the schedule, from its own peak
            group['lr'] = lr if group['base_lr'] == c.learning_rate else group['base_lr'] * (
                lr / c.learning_rate if c.learning_rate else 0.0)
        total = torch.zeros(len(task.metrics), device=device)
        for micro in range(local_steps):
            # gradients are averaged across processes only on the last micro-step; syncing on every
            # one would be wasted communication
            last_micro = micro == local_steps - 1
            with nullcontext() if last_micro or not ddp else model.no_sync():
                loss, sums = task.micro_step(run, c, run.rank * local_steps + micro)
                scaler.scale(loss / local_steps).backward()
            total += sums
        # one small all-reduce a step: the metrics over all processes, and whether any of them got a
        # signal or ran out of time (so that all of them take the same decisions below)
        timed_out = c.max_time > 0 and time.time() - start_time >= c.max_time
        status = torch.cat([total, torch.tensor([float(bool(signals)), float(timed_out)], device=device)])
        if run.world_size > 1:
            torch.distributed.all_reduce(status)
        *sums, signalled, timed_out = status.tolist()  # one device-to-host copy, the step's one sync
        metrics = {name: value / task.units_per_step(run, c) for name, value in zip(task.metrics, sums)}
        loss_value = metrics[task.metrics[0]]
        if not math.isfinite(loss_value):
            bar.close()
            fail(f"the training loss became {loss_value} at step {run.step + 1} (lr {lr:.3g}); stopped without "
                 f"saving, so {last_good(c.out_dir)}. {task.hint}")
        grad_norm = None
        if c.grad_clip > 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip)  # read only when logged: no sync a step
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
            record = {'step': run.step, **task.progress(run), **metrics, 'lr': lr,
                      'grad_norm': grad_norm.item() if grad_norm is not None else None}
            if run.tokens_per_step:
                tokens_per_sec = interval_tokens / max(seconds, 1e-9)
                mfu = (run.raw_model.estimate_mfu(tokens_per_sec / run.world_size, peak, run.block_size)
                       if peak else None)
                record.update(tokens_per_sec=tokens_per_sec, mfu=mfu)
            record.update(memory_gb=memory_gb(device), elapsed=elapsed())
            if bar.disable:
                left = (c.max_iters - run.step) * seconds / interval_steps
                if c.max_time > 0:
                    left = min(left, c.max_time - (time.time() - start_time))
                print0(f"step {run.step}/{c.max_iters} | {task.step_text(metrics)} | lr {lr:.2e}"
                       + (f" | {tokens_per_sec:,.0f} tok/s" if run.tokens_per_step else "")
                       + (f" | mfu {record['mfu']:.1%}" if record.get('mfu') else "")
                       + f" | eta {max(0, left) / 60:.1f} min")
            interval_start, interval_tokens, interval_steps = time.time(), 0, 0
        bar.update(1)
        if not bar.disable:  # a terminal's bar; in a log the lines above say it
            speed = f" {tokens_per_sec:,.0f} tok/s" if tokens_per_sec is not None else ""
            bar.set_postfix_str(f"{task.step_text(metrics)} lr {lr:.2e}{speed}", refresh=False)

        if eval_now:
            found = evaluate(run, c, task)
            record.update(found)
            improved = run.val_loss < run.best_val_loss
            run.best_val_loss = min(run.best_val_loss, run.val_loss)
            log(record)  # before the save: a resume drops log lines past its checkpoint, never misses one
            saved = save(run, c, task, improved, elapsed())
            say(f"step {run.step}: {task.eval_text(found)} | {saved}")
            interval_start = time.time()  # evaluation and saving are not training time
        else:
            if record is not None:
                log(record)
            if signalled:
                save(run, c, task, False, elapsed())
        if stop_reason:
            break
    bar.close()
    return stop_reason, elapsed()


# -----------------------------------------------------------------------------
# a whole run

def finish(run, c, task):
    """Task.finish after a completed schedule; a write that fails there (a full disk) costs no training."""
    try:
        task.finish(run, c)
    except OSError as e:
        fail(f"{e}; {c.out_dir}/ckpt.pt holds the finished run: free some space, then run the same command with "
             f"--init_from=resume to finish")


def train(task, defaults, argv, help_source):
    """Run the command: its settings (`defaults`, with the comments in `help_source` for --help) as a
    config file and --key=value set them, then run_task."""
    start_time = time.time()
    try:
        c = SimpleNamespace(**configure(defaults, argv, help_source=help_source,
                                        choices={key: values for key, values in CHOICES.items() if key in defaults}))
    except ConfigError as e:
        fail(str(e))
    return run_task(task, c, start_time)


def run_task(task, c, start_time=None):
    """Set-up, resume, the loop, the summary and Task.finish, for the settings c (a namespace). -> the run."""
    start_time = start_time or time.time()
    task.check_config(c)  # first: a command may derive shared settings (classify.py: max_iters from epochs)
    check_run_config(c)
    ddp, rank, world_size, device = start_processes(c.device, c.gradient_accumulation_steps, c.ddp_timeout)
    meter = Meter(c, rank, world_size, device)  # energy and CO2-eq (mirim/emissions.py)
    try:
        lock = claim_out_dir(c.out_dir, resume=c.init_from == 'resume') if rank == 0 else None
    except ValueError as e:
        fail(str(e))
    try:
        meter.start()
        run = set_up(c, task, rank, world_size, device)
        if run.checkpoint is not None:
            restore(run, c, task)
            if run.step >= c.max_iters:
                print0(f"nothing to do: the checkpoint is at step {run.step}, max_iters is {c.max_iters}")
                if rank == 0:  # a run that ended before its last step (a classifier.pt on a full disk)
                    finish(run, c, task)
                return run
        wrap_model(run, c, ddp)
        describe(run, c, task)
        log = meter.wrap(RunLog(c, run.step, rank))
        steps_before = run.step
        try:
            with stop_signals() as signals:
                stop_reason, elapsed = train_loop(run, c, task, signals, start_time, log)
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
            print0(f"{stop_reason} at step {run.step}: saved {c.out_dir}/{checkpoint_name(c)} ({minutes:.1f} min); continue with "
                   f"--init_from=resume{meter.summary()}")
        else:
            session = f" (this session: {run.step - steps_before} steps, {minutes:.1f} min)" if steps_before else ""
            tokens = f", {run.tokens_seen:,} tokens" if run.tokens_seen else ""
            bpb = f" ({run.val_bpb:.3f} bpb)" if run.val_bpb is not None else ""
            print0(f"done: {run.step} steps{tokens} in {elapsed / 60:.1f} min{session}; val loss {run.val_loss:.4f}"
                   f"{bpb}; best {run.best_val_loss:.4f}{meter.summary()}; checkpoint {c.out_dir}/{checkpoint_name(c)}")
            if rank == 0:
                finish(run, c, task)
        if ddp:  # every process reaches the end before any tears the group down (gloo aborts a process
            torch.distributed.barrier()  # whose peer closes while rank 0 is still saving)
    finally:
        meter.stop()
        if lock is not None:
            os.close(lock)
        if ddp:
            torch.distributed.destroy_process_group()
    return run
