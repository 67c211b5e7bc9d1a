"""
Preference tuning with DPO (Rafailov et al. 2023): teach a fine-tuned (SFT) chat model to prefer the
chosen reply of each pair over the rejected one, from data/prepare_pref.py's pairs.

    python data/prepare_pref.py --input pairs.jsonl --model out/chat --out data/pref
    python dpo.py --init_from=out/chat --data_dir=data/pref --out_dir=out/chat-dpo
    torchrun --standalone --nproc_per_node=8 dpo.py config/dpo_biblia_pt.py

The loss compares the policy's log-probability of each reply (summed over the reply's tokens only)
with the starting model's, the reference: with h = (log pi(chosen) - log ref(chosen))
- (log pi(rejected) - log ref(rejected)),
    sigmoid (DPO):  -log sigmoid(beta h)
    with label_smoothing e (cDPO, Mitchell 2023: each label is wrong with probability e):
                    -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
    ipo (Azar et al. 2023): (h - 1 / (2 beta))^2
The reference is fixed, so its log-probabilities are computed once, before the first step, and
stored in out_dir/reference.pt: no second model sits in memory while training. The implicit
rewards beta (log pi - log ref) of the two replies give the reward accuracy (the share of pairs
where the chosen one's is higher) and the margin (their mean difference); log.jsonl has them, the
loss and the log-probabilities, for the training steps and, at each evaluation, for held-out pairs
(val_*) and a fixed sample of training pairs (eval_train_*).

The loop is train.py's: checkpoints written atomically (ckpt.pt, best.pt by held-out loss) that
checkpoint.load_model and export.py read like any other, Ctrl-C or SIGTERM saves and exits,
--init_from=resume continues exactly, weights that are no longer finite are never saved, and under
torchrun micro-batch j of each step takes the same pairs whichever process runs it (the pair order
is a seeded permutation per epoch), so N processes match one with N times the accumulation.
"""

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from mirim.atomic import link_atomic, save_atomic
from mirim.checkpoint import load_checkpoint, model_from_checkpoint, resolve
from mirim.init_from import check_tokenizer
from mirim.out_dir import claim_out_dir, last_good, RunLog
from mirim.run import rng_state, set_rng_state
from mirim.common import autocast, fail, peer_timeout, start_processes, stop_signals, training_dtype
from mirim.configurator import ConfigError, configure, print_config
from data.prepare_pref import read_pairs
from mirim.shards import load_meta, ShardError
from mirim.tokenizer import load_tokenizer
from mirim.optim import get_lr

# -----------------------------------------------------------------------------
# Default config. A config file (config/dpo_*.py) or --key=value overrides any of these.
# I/O
out_dir = 'out/dpo'               # ckpt.pt (latest), best.pt (best held-out loss), reference.pt, log.jsonl
data_dir = 'data/pref'            # preference pairs from data/prepare_pref.py
init_from = ''                    # the fine-tuned (SFT) model to start from and compare with: a mirim checkpoint
                                  # or out_dir, or a Hugging Face folder; 'resume' continues out_dir/ckpt.pt
eval_interval = 50                # steps between evaluations; each one also saves ckpt.pt
eval_pairs = 256                  # held-out pairs (and training pairs) per evaluation; 0 = all held-out pairs
log_interval = 10                 # steps between log.jsonl lines
wandb_log = False                 # also log to Weights & Biases (WANDB_MODE=offline works)
wandb_project = 'mirim'
wandb_run_name = ''               # '' = the out_dir's name
# DPO
loss_type = 'sigmoid'             # 'sigmoid' (DPO; with label_smoothing > 0: cDPO) | 'ipo'
beta = 0.1                        # how far the policy may move from the reference (higher: less far)
label_smoothing = 0.0             # cDPO: the probability that a pair's preference label is wrong, in [0, 0.5)
dropout = 0.0                     # 0 keeps policy == reference at step 0 (dropout would make them differ)
# batch: pairs per optimizer step = batch_size * gradient_accumulation_steps
batch_size = 8                    # pairs per micro-batch, per process (each pair is two sequences)
gradient_accumulation_steps = 1   # micro-batches per step over ALL processes (divided among DDP ranks)
# optimizer: AdamW, as in train.py
learning_rate = 1e-5              # peak learning rate; DPO wants a small one (TeenyTinyLlama's Aira: 1e-6-1e-5)
min_lr = 1e-6
lr_schedule = 'cosine'            # 'cosine' | 'wsd' | 'constant', after a linear warmup
warmup_iters = 10
lr_decay_iters = 0                # 0 = max_iters
wsd_decay_fraction = 0.2
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                   # clip the global gradient norm to this; 0 = no clipping
max_iters = 200
max_time = 0.0                    # seconds: evaluate, save and stop once this run has lasted this long; 0 = no limit
# system
device = 'auto'
dtype = 'auto'                    # 'float32' | 'bfloat16' | 'float16'; log-probabilities are summed in float32
seed = 1337
ddp_timeout = 300.0

DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and k != 'DEFAULTS'
            and isinstance(v, (int, float, bool, str, type(None)))}
METRICS = ('loss', 'reward_accuracy', 'reward_margin', 'chosen_logp', 'rejected_logp', 'ref_chosen_logp',
           'ref_rejected_logp')


# -----------------------------------------------------------------------------
# the loss

def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.0,
             loss_type='sigmoid'):
    """Per-pair losses and the implicit rewards beta (log pi - log ref) of the chosen and rejected
    replies, from summed reply log-probabilities (tensors of shape (pairs,))."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == 'sigmoid':
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == 'ipo':
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r}: expected 'sigmoid' or 'ipo'")
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def metrics(losses, chosen_rewards, rejected_rewards, logps, ref):
    """The sums of METRICS over a batch of pairs (summed, so that batches and processes add up)."""
    return torch.stack([losses.detach().sum(), (chosen_rewards > rejected_rewards).float().sum(),
                        (chosen_rewards - rejected_rewards).sum(), logps[:, 0].detach().sum(),
                        logps[:, 1].detach().sum(), ref[:, 0].sum(), ref[:, 1].sum()])


# -----------------------------------------------------------------------------
# log-probabilities of replies

def collate(pairs, indices, pad_id):
    """-> (ids, mask) of shape (2B, T): the chosen sides of the pairs, then their rejected sides, padded on
    the right (a causal model's earlier positions never see the padding); mask 1 = a reply token."""
    sides = [pairs[i][0:2] for i in indices] + [pairs[i][2:4] for i in indices]
    width = max(len(ids) for ids, _ in sides)
    ids = torch.full((len(sides), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sides), width), dtype=torch.bool)
    for row, (x, m) in enumerate(sides):
        ids[row, :len(x)] = torch.from_numpy(x)
        mask[row, :len(m)] = torch.from_numpy(m)
    return ids, mask


def sequence_logps(model, ids, mask):
    """Sum over each row of log p(token | the tokens before it), for the tokens where mask is 1 (the first
    token has nothing before it and is never counted). -> float32 (rows,)."""
    logits, _ = model(ids[:, :-1])
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(-1)


def pair_logps(model, pairs, indices, pad_id, device, amp):
    """-> (len(indices), 2): the summed reply log-probabilities of the chosen and rejected sides."""
    ids, mask = collate(pairs, indices, pad_id)
    with amp:
        logps = sequence_logps(model, ids.to(device), mask.to(device))
    return logps.view(2, -1).t()


@torch.no_grad()
def reference_logps(model, pairs, batch_size, pad_id, device, amp, rank=0, world_size=1):
    """The starting model's (N, 2) reply log-probabilities of every pair; under DDP each process does a
    share and the shares are added up."""
    out = torch.zeros(len(pairs), 2, device=device)
    model.eval()
    for n, start in enumerate(range(0, len(pairs), batch_size)):
        if n % world_size == rank:
            indices = list(range(start, min(start + batch_size, len(pairs))))
            out[indices] = pair_logps(model, pairs, indices, pad_id, device, amp)
    if world_size > 1:
        torch.distributed.all_reduce(out)
    model.train()
    return out.cpu()


# -----------------------------------------------------------------------------
# which pairs each micro-batch takes

class PairOrder:
    """Position p of the training stream is pair perm_e[p % N] of epoch e = p // N, perm_e a permutation
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


# -----------------------------------------------------------------------------
# set-up

def check_config(c):
    checks = [
        (c.init_from, "init_from must name the fine-tuned model to start from (a checkpoint, out_dir or HF "
                      "folder), or be 'resume'"),
        (c.loss_type in ('sigmoid', 'ipo'), "loss_type must be 'sigmoid' or 'ipo'"),
        (c.beta > 0, "beta must be positive"),
        (0 <= c.label_smoothing < 0.5, "label_smoothing must be in [0, 0.5)"),
        (c.loss_type == 'sigmoid' or c.label_smoothing == 0, "label_smoothing applies to loss_type='sigmoid' only"),
        (c.lr_schedule in ('cosine', 'wsd', 'constant'), "lr_schedule must be 'cosine', 'wsd' or 'constant'"),
        (c.batch_size >= 1 and c.gradient_accumulation_steps >= 1 and c.max_iters >= 1,
         "batch_size, gradient_accumulation_steps and max_iters must be at least 1"),
        (c.eval_interval >= 1 and c.log_interval >= 1 and c.eval_pairs >= 0,
         "eval_interval and log_interval must be at least 1, eval_pairs not negative"),
        (c.learning_rate >= 0 and c.min_lr >= 0 and c.warmup_iters >= 0 and c.lr_decay_iters >= 0,
         "learning rates, warmup_iters and lr_decay_iters must not be negative"),
        (0 <= c.dropout < 1 and c.weight_decay >= 0 and c.grad_clip >= 0 and c.max_time >= 0 and c.ddp_timeout > 0,
         "dropout must be in [0, 1); weight_decay, grad_clip, max_time not negative; ddp_timeout positive"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)


def load_start(c, tokenizer, say):
    """-> (the model to train, on the CPU in float32, the resumed checkpoint or None)."""
    if c.init_from == 'resume':
        path = os.path.join(c.out_dir, 'ckpt.pt')
        if not os.path.exists(path):
            fail(f"init_from='resume' but {path} does not exist")
        checkpoint = load_checkpoint(path)
        if 'dpo' not in checkpoint:
            fail(f"{path} is not a dpo.py checkpoint; resume it with train.py")
        return model_from_checkpoint(checkpoint, c.dropout), checkpoint
    kind, where = resolve(c.init_from)
    if kind == 'hf':
        from mirim.hf import load_hf
        model, _ = load_hf(where, tokenizer=False)
        model = model_from_checkpoint({'model_config': dataclasses.asdict(model.config), 'model': model.state_dict()},
                                      c.dropout)
    else:
        checkpoint = load_checkpoint(where)
        check_tokenizer(checkpoint, tokenizer, c.data_dir, c.init_from)
        model = model_from_checkpoint(checkpoint, c.dropout)
    say(f"starting from {c.init_from} (policy and reference)")
    return model, None


def data_fingerprint(meta):
    return hashlib.sha256(json.dumps(meta['splits'], sort_keys=True).encode()).hexdigest()[:16]


def set_up(c, rank, world_size, device, say):
    torch.manual_seed(c.seed + rank)
    try:
        meta = load_meta(c.data_dir)
        tokenizer = load_tokenizer(meta['tokenizer'], base_dir=c.data_dir)
        pairs = {split: read_pairs(c.data_dir, split, meta) for split in ('train', 'val')}
    except (FileNotFoundError, ShardError, KeyError, ValueError) as e:
        fail(f"data {c.data_dir}: {e}")
    try:
        model, checkpoint = load_start(c, tokenizer, say)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    longest = max(len(p[k]) for split in pairs.values() for p in split for k in (0, 2))
    if longest > model.config.block_size + 1:  # the last token is only a target
        fail(f"{c.data_dir} holds sequences of {longest} tokens, longer than the model's context "
             f"({model.config.block_size}): prepare it again with --max_length={model.config.block_size}")
    if meta['vocab_size'] > model.config.vocab_size:
        fail(f"the data's vocab ({meta['vocab_size']}) is larger than the model's ({model.config.vocab_size})")
    try:
        dtype = training_dtype(c.dtype, device)
    except ValueError as e:
        fail(str(e))
    model.to(device)
    optimizer = model.configure_optimizer(c.weight_decay, c.learning_rate, (c.beta1, c.beta2), device.split(':')[0])
    n_eval = lambda n: n if c.eval_pairs == 0 else min(n, c.eval_pairs)  # noqa: E731
    eval_train = torch.randperm(len(pairs['train']), generator=torch.Generator().manual_seed(c.seed + 1))
    return SimpleNamespace(
        meta=meta, tokenizer=tokenizer, pairs=pairs, raw_model=model, model=model, checkpoint=checkpoint,
        pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id, dtype=dtype,
        amp=autocast(device, dtype), optimizer=optimizer, order=PairOrder(len(pairs['train']), c.seed),
        scaler=torch.amp.GradScaler(device.split(':')[0], enabled=dtype == torch.float16),
        eval_sets={'val': list(range(n_eval(len(pairs['val'])))),
                   'eval_train': sorted(eval_train[:n_eval(len(pairs['train']))].tolist())},
        step=0, best_val_loss=float('inf'), val_loss=None, elapsed_before=0.0, reference=None)


def reference(run, c, rank, world_size, device, say):
    """The reference log-probabilities: computed now (a new run) and stored in out_dir/reference.pt, or
    read back from there (a resumed run: the reference is the model the run started from)."""
    path = os.path.join(c.out_dir, 'reference.pt')
    fingerprint = data_fingerprint(run.meta)
    if run.checkpoint is not None:
        try:
            ref = torch.load(path, map_location='cpu', weights_only=True)
        except FileNotFoundError:
            fail(f"{path} is missing: it holds the starting model's log-probabilities that the run compares with")
        if ref.get('data') != fingerprint:
            fail(f"{path} was computed on other data than {c.data_dir}: resume on the data the run started with")
        return ref
    t0 = time.time()
    ref = {split: reference_logps(run.raw_model, pairs, c.batch_size * 2, run.pad_id, device, run.amp, rank,
                                  world_size) for split, pairs in run.pairs.items()}
    if not all(torch.isfinite(v).all() for v in ref.values()):
        fail(f"the starting model {c.init_from} gives non-finite log-probabilities on {c.data_dir}")
    ref.update(data=fingerprint, init_from=c.init_from)
    if rank == 0:
        save_atomic(ref, path)
    say(f"reference log-probabilities of {len(run.pairs['train']):,} train and {len(run.pairs['val']):,} held-out "
        f"pairs: {time.time() - t0:.1f}s, stored in {path}")
    return ref


def restore(run, c, rank, say):
    checkpoint, run.checkpoint = run.checkpoint, None
    run.optimizer.load_state_dict(checkpoint['optimizer'])
    run.scaler.load_state_dict(checkpoint['scaler'])
    run.step, run.best_val_loss, run.val_loss = checkpoint['step'], checkpoint['best_val_loss'], checkpoint['val_loss']
    run.elapsed_before = checkpoint.get('elapsed', 0.0)
    rng = checkpoint['rng']
    set_rng_state(rng[rank] if rank < len(rng) else rng[0])
    say(f"resuming {c.out_dir}/ckpt.pt at step {run.step}")


# -----------------------------------------------------------------------------
# evaluation, saving

@torch.no_grad()
def evaluate(run, c, split, rank, world_size, device):
    """METRICS averaged over the fixed pairs of run.eval_sets[split] ('val' or 'eval_train')."""
    indices = run.eval_sets[split]
    pairs = run.pairs['val' if split == 'val' else 'train']
    ref_all = run.reference['val' if split == 'val' else 'train']
    total = torch.zeros(len(METRICS), device=device)
    run.model.eval()
    for n, start in enumerate(range(0, len(indices), c.batch_size)):
        if n % world_size != rank:
            continue
        batch = indices[start:start + c.batch_size]
        logps = pair_logps(run.raw_model, pairs, batch, run.pad_id, device, run.amp)
        ref = ref_all[batch].to(device)
        total += metrics(*dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], c.beta, c.label_smoothing,
                                   c.loss_type), logps, ref)
    if world_size > 1:
        torch.distributed.all_reduce(total)
    run.model.train()
    prefix = 'val_' if split == 'val' else 'eval_train_'
    return {prefix + name: v / len(indices) for name, v in zip(METRICS, total.tolist())}


def save(run, c, rank, world_size, improved, elapsed):
    """ckpt.pt (and best.pt when the held-out loss improved); every rank calls it, rank 0 writes. Weights that
    are no longer finite are never saved."""
    states = [None] * world_size
    if world_size > 1:
        torch.distributed.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if not all(torch.isfinite(p).all() for p in run.raw_model.parameters()):
        fail(f"the weights are no longer finite at step {run.step} (the training diverged); stopped without "
             f"saving, so {last_good(c.out_dir)}. Try a lower learning_rate or a higher beta")
    if rank != 0:
        return ''
    ckpt = {'model': run.raw_model.state_dict(), 'model_config': dataclasses.asdict(run.raw_model.config),
            'config': vars(c), 'tokenizer': run.tokenizer.to_dict(), 'step': run.step, 'tokens_seen': 0,
            'best_val_loss': run.best_val_loss, 'val_loss': run.val_loss, 'val_bpb': None,
            'optimizer': run.optimizer.state_dict(), 'scaler': run.scaler.state_dict(), 'rng': states,
            'data_dir': c.data_dir, 'elapsed': elapsed, 'dpo': {'init_from': c.init_from, 'beta': c.beta,
                                                                 'loss_type': c.loss_type}}
    path = os.path.join(c.out_dir, 'ckpt.pt')
    try:
        save_atomic(ckpt, path)
        if improved:
            link_atomic(path, os.path.join(c.out_dir, 'best.pt'))
    except (OSError, RuntimeError) as e:
        fail(f"cannot write {path}: {e}; {last_good(c.out_dir)} (free some space, then --init_from=resume)")
    return 'saved ckpt.pt' + (' and best.pt' if improved else '')


# -----------------------------------------------------------------------------
# the loop

def train_loop(run, c, rank, world_size, device, signals, start_time, log, say):
    ddp = isinstance(run.model, torch.nn.parallel.DistributedDataParallel)
    local = c.gradient_accumulation_steps // world_size
    params = [p for p in run.raw_model.parameters() if p.requires_grad]
    elapsed = lambda: run.elapsed_before + time.time() - start_time  # noqa: E731
    pairs_per_step = c.batch_size * c.gradient_accumulation_steps

    def run_eval():
        found = {**evaluate(run, c, 'val', rank, world_size, device),
                 **evaluate(run, c, 'eval_train', rank, world_size, device)}
        if not math.isfinite(found['val_loss']):
            fail(f"the held-out loss became {found['val_loss']} at step {run.step}; stopped without saving, "
                 f"so {last_good(c.out_dir)}")
        run.val_loss = found['val_loss']
        say(f"step {run.step}: held-out loss {found['val_loss']:.4f}, reward accuracy "
            f"{found['val_reward_accuracy']:.1%}, margin {found['val_reward_margin']:.3f} | train pairs: loss "
            f"{found['eval_train_loss']:.4f}, accuracy {found['eval_train_reward_accuracy']:.1%}")
        return found

    if run.step == 0:
        log({'step': 0, 'pairs': 0, 'lr': None, **run_eval(), 'elapsed': elapsed()})

    stop_reason = None
    while run.step < c.max_iters:
        lr = get_lr(run.step, c)
        for group in run.optimizer.param_groups:
            group['lr'] = lr
        total = torch.zeros(len(METRICS), device=device)
        for micro in range(local):
            indices = run.order.micro_batch(run.step, rank * local + micro, c)
            last_micro = micro == local - 1
            with nullcontext() if last_micro or not ddp else run.model.no_sync():
                logps = pair_logps(run.model, run.pairs['train'], indices, run.pad_id, device, run.amp)
                ref = run.reference['train'][indices].to(device)
                losses, chosen_rewards, rejected_rewards = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1],
                                                                    c.beta, c.label_smoothing, c.loss_type)
                run.scaler.scale(losses.mean() / local).backward()
            total += metrics(losses, chosen_rewards, rejected_rewards, logps, ref)
        timed_out = c.max_time > 0 and time.time() - start_time >= c.max_time
        status = torch.cat([total, torch.tensor([float(bool(signals)), float(timed_out)], device=device)])
        if world_size > 1:
            torch.distributed.all_reduce(status)
        status = status.tolist()
        step_metrics = {name: v / pairs_per_step for name, v in zip(METRICS, status)}
        signalled, timed_out = status[-2], status[-1]
        if not math.isfinite(step_metrics['loss']):
            fail(f"the loss became {step_metrics['loss']} at step {run.step + 1} (lr {lr:.3g}); stopped without "
                 f"saving, so {last_good(c.out_dir)}. Try a lower learning_rate or a higher beta")
        grad_norm = None
        if c.grad_clip > 0:
            run.scaler.unscale_(run.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip).item()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        if signalled:
            stop_reason = f"stopped by {signals[0] if signals else 'a signal to another process'}"
        elif timed_out:
            stop_reason = f"max_time ({c.max_time:g} s) reached"
        last = run.step >= c.max_iters or stop_reason is not None
        eval_now = (run.step % c.eval_interval == 0 or last) and not signalled
        record = {'step': run.step, 'pairs': run.step * pairs_per_step, 'lr': lr, 'grad_norm': grad_norm,
                  **step_metrics, 'elapsed': elapsed()}
        if run.step % c.log_interval == 0 or last or eval_now:
            say(f"step {run.step}/{c.max_iters} | loss {step_metrics['loss']:.4f} | reward accuracy "
                f"{step_metrics['reward_accuracy']:.1%} | margin {step_metrics['reward_margin']:.3f} | lr {lr:.2e}")
        if eval_now:
            record.update(run_eval())
            improved = run.val_loss < run.best_val_loss
            run.best_val_loss = min(run.best_val_loss, run.val_loss)
            log(record)  # before the save: a resume drops log lines past its checkpoint, never misses one
            say(save(run, c, rank, world_size, improved, elapsed()))
        else:
            if run.step % c.log_interval == 0 or last:
                log(record)
            if signalled:
                save(run, c, rank, world_size, False, elapsed())
        if stop_reason:
            break
    return stop_reason, elapsed()


def main(argv):
    start_time = time.time()
    try:
        c = SimpleNamespace(**configure(DEFAULTS, argv, help_source=__file__))  # --help reads the comments above
    except ConfigError as e:
        fail(str(e))
    check_config(c)
    ddp, rank, world_size, device = start_processes(c.device, c.gradient_accumulation_steps, c.ddp_timeout)
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        lock = claim_out_dir(c.out_dir, resume=c.init_from == 'resume') if rank == 0 else None
    except ValueError as e:
        fail(str(e))
    try:
        run = set_up(c, rank, world_size, device, say)
        run.reference = reference(run, c, rank, world_size, device, say)
        if run.checkpoint is not None:
            restore(run, c, rank, say)
            if run.step >= c.max_iters:
                say(f"nothing to do: the checkpoint is at step {run.step}, max_iters is {c.max_iters}")
                return
        if ddp:
            from torch.nn.parallel import DistributedDataParallel
            run.model = DistributedDataParallel(run.raw_model, device_ids=[device] if device.startswith('cuda')
                                                else None, forward_sync_buffers=False)
        say("config:")
        print_config(vars(c), say)
        say(f"data: {c.data_dir}: {len(run.pairs['train']):,} train pairs, {len(run.pairs['val']):,} held-out; "
            f"{c.batch_size * c.gradient_accumulation_steps} pairs a step, {c.max_iters} steps; device {device}, "
            f"{world_size} process{'es' if world_size > 1 else ''}")
        log = RunLog(c, run.step, rank)
        try:
            with stop_signals() as signals:
                stop_reason, elapsed = train_loop(run, c, rank, world_size, device, signals, start_time, log, say)
        except RuntimeError as e:
            if ddp and peer_timeout(e, rank, c.ddp_timeout):
                fail(peer_timeout(e, rank, c.ddp_timeout))
            raise
        finally:
            log.close()
        if stop_reason:
            say(f"{stop_reason} at step {run.step}: saved {c.out_dir}/ckpt.pt; continue with --init_from=resume")
        else:
            say(f"done: {run.step} steps in {elapsed / 60:.1f} min; held-out loss {run.val_loss:.4f}; "
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
