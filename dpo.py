"""
Preference tuning with DPO (Rafailov et al. 2023): teach a fine-tuned (SFT) chat model to prefer the
chosen reply of each pair over the rejected one, from data/prepare_pref.py's pairs.

    python data/prepare_pref.py --input pairs.jsonl --model out/chat --out data/pref
    python dpo.py --init_from=out/chat --data_dir=data/pref --out_dir=out/chat-dpo
    torchrun --standalone --nproc_per_node=8 dpo.py config/dpo_biblia_pt.py

The loss compares the policy's log-probability of each reply (summed over the reply's tokens only)
with the starting model's, the reference: with r(y) = log pi(y) - log ref(y), the log-ratio of a
reply y, and h = r(chosen) - r(rejected),
    sigmoid (DPO):  -log sigmoid(beta h)
    with label_smoothing e (cDPO, Mitchell 2023: each label is wrong with probability e):
                    -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
    ipo (Azar et al. 2023): (h - 1 / (2 beta))^2, where each log-ratio is divided by its reply's
                    length in tokens first: h = r(chosen) / |chosen| - r(rejected) / |rejected|
                    (the form TRL uses, which the IPO authors confirmed to it)
The reference is fixed, so its log-probabilities are computed once, before the first step, and
stored in out_dir/reference.pt: no second model sits in memory while training. The implicit
rewards beta r(y) (for ipo beta r(y) / |y|, per reply token) of the two replies give the reward
accuracy (the share of pairs where the chosen one's is higher) and the margin (their mean
difference); log.jsonl has them, the loss and the (summed) log-probabilities, for the training steps
and, at each evaluation, for held-out pairs (val_*) and a fixed sample of training pairs
(eval_train_*). When the pairs name their task (data/prepare_pref.py keeps a record's "task"; the
Bible pairs of data/biblia/make_tasks.py have one), each evaluation also logs the held-out reward
accuracy of each task: val_reward_accuracy/<task>.

A pair's log-probabilities do not depend on how the pairs are batched: every forward pass of a run has
the same shape, batch_size pairs (a last partial batch is filled with rows of padding) padded to the
longest sequence of the data set, so the reference, the training steps and each evaluation compute a
pair with the same kernels on the same tokens. At step 0 (policy == reference) the rewards are then
exactly 0 and the reward accuracy exactly 0, whatever batch_size, eval_pairs or the number of
processes. (Padded to each batch's own longest sequence, a pair's log-probability moved by ~1e-6 with
the batch it was in, and the reward accuracy's strict comparison counted such noise as wins.) The
price: every batch costs what a batch holding the data set's longest pair costs (the memory peak is
unchanged; on uneven lengths, more compute a step).

The loop is train.py's run skeleton (mirim/run.py): checkpoints written atomically (ckpt.pt, best.pt
by held-out loss) that mirim.checkpoint.load_model and export.py read like any other, Ctrl-C or SIGTERM
saves and exits, --init_from=resume continues exactly, weights that are no longer finite are never
saved, AdamW or Muon (--optimizer=muon), a mirim checkpoint or a Hugging Face folder to start from (with
the same tokenizer checks as train.py), and under torchrun micro-batch j of each step takes the same
pairs whichever process runs it (the pair order is a seeded permutation per epoch), so N processes
match one with N times the accumulation. This file holds what is DPO's own: its pairs, its loss and
its evaluation.
"""

import hashlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from mirim.atomic import save_atomic
from mirim.checkpoint import CheckpointError, load_checkpoint
from mirim.common import fail, print0
from mirim.pref_data import read_pair_tasks, read_pairs
from mirim.run import ExampleOrder, Task, sum_over_batches, train
from mirim import train_config

# -----------------------------------------------------------------------------
# Default config: every run setting train.py has (mirim/train_config.py: logging, batch, optimizer, schedule,
# system; `python dpo.py --help` lists them all), with DPO's values below where they differ, and DPO's own.
# A config file (config/dpo_*.py) or --key=value overrides any of them.
# I/O
out_dir = 'out/dpo'               # ckpt.pt (latest), best.pt (best held-out loss), reference.pt, log.jsonl
data_dir = 'data/pref'            # preference pairs from data/prepare_pref.py
init_from = ''                    # the fine-tuned (SFT) model to start from and compare with: a mirim checkpoint
                                  # or out_dir, or a Hugging Face folder; 'resume' continues out_dir/ckpt.pt
eval_interval = 50                # steps between evaluations; each one also saves ckpt.pt
eval_pairs = 256                  # held-out pairs (and training pairs) per evaluation; 0 = all held-out pairs
# DPO
loss_type = 'sigmoid'             # 'sigmoid' (DPO; with label_smoothing > 0: cDPO) | 'ipo' (log-ratios per reply token)
beta = 0.1                        # how far the policy may move from the reference (higher: less far)
label_smoothing = 0.0             # cDPO: the probability that a pair's preference label is wrong, in [0, 0.5)
dropout = 0.0                     # 0 keeps policy == reference at step 0 (dropout would make them differ)
# batch: pairs per optimizer step = batch_size * gradient_accumulation_steps
batch_size = 8                    # pairs per micro-batch, per process (each pair is two sequences)
# optimizer
learning_rate = 1e-5              # peak learning rate; DPO wants a small one (TeenyTinyLlama's Aira: 1e-6-1e-5)
muon_lr = 1e-3                    # optimizer='muon': the blocks' matrices' peak learning rate (untuned)
min_lr = 1e-6
warmup_iters = 10
weight_decay = 0.0
max_iters = 200
dtype = 'auto'                    # 'float32' | 'bfloat16' | 'float16'; log-probabilities are summed in float32

DEFAULTS = {**train_config.RUN_DEFAULTS, **{k: v for k, v in globals().items() if not k.startswith('_') and k != 'DEFAULTS'
                                               and isinstance(v, (int, float, bool, str, type(None)))}}
METRICS = ('loss', 'reward_accuracy', 'reward_margin', 'chosen_logp', 'rejected_logp', 'ref_chosen_logp',
           'ref_rejected_logp')


# -----------------------------------------------------------------------------
# the loss

def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.0,
             loss_type='sigmoid', chosen_tokens=None, rejected_tokens=None):
    """Per-pair losses and the implicit rewards of the chosen and rejected replies, from summed reply
    log-probabilities (tensors of shape (pairs,)). The rewards are beta (log pi - log ref); for 'ipo', which
    needs the replies' lengths (chosen_tokens, rejected_tokens: reply tokens per pair), each log-ratio is
    divided by its reply's length first, in the loss and the rewards."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == 'ipo':
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type='ipo' needs the replies' lengths (chosen_tokens, rejected_tokens)")
        chosen, rejected = chosen / chosen_tokens, rejected / rejected_tokens
    h = chosen - rejected
    if loss_type == 'sigmoid':
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == 'ipo':
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r}: expected 'sigmoid' or 'ipo'")
    return losses, beta * chosen.detach(), beta * rejected.detach()


def metrics(losses, chosen_rewards, rejected_rewards, logps, ref):
    """The sums of METRICS over a batch of pairs (summed, so that batches and processes add up)."""
    return torch.stack([losses.detach().sum(), (chosen_rewards > rejected_rewards).float().sum(),
                        (chosen_rewards - rejected_rewards).sum(), logps[:, 0].detach().sum(),
                        logps[:, 1].detach().sum(), ref[:, 0].sum(), ref[:, 1].sum()])


# -----------------------------------------------------------------------------
# log-probabilities of replies

def collate(pairs, indices, pad_id, width=None, rows=None):
    """-> (ids, mask) of shape (2 R, T): the chosen sides of the pairs, then their rejected sides, padded on
    the right (a causal model's earlier positions never see the padding) to `width` (default: the longest
    side); mask 1 = a reply token. R = rows pairs (default len(indices)): each half ends with rows of padding
    (mask 0) after the pairs, so that batches of fewer pairs keep the shape."""
    rows = len(indices) if rows is None else rows
    if rows < len(indices):
        raise ValueError(f"{len(indices)} pairs do not fit in {rows} rows")
    sides = [pairs[i][0:2] for i in indices], [pairs[i][2:4] for i in indices]
    width = max(len(ids) for half in sides for ids, _ in half) if width is None else width
    ids = torch.full((2 * rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((2 * rows, width), dtype=torch.bool)
    for start, half in zip((0, rows), sides):
        for row, (x, m) in enumerate(half, start):
            ids[row, :len(x)] = torch.from_numpy(x)
            mask[row, :len(m)] = torch.from_numpy(m)
    return ids, mask


def sequence_logps(model, ids, mask):
    """Sum over each row of log p(token | the tokens before it), for the tokens where mask is 1 (the first
    token has nothing before it and is never counted). -> float32 (rows,)."""
    logits, _ = model(ids[:, :-1])
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(-1)


def pair_logps(model, pairs, indices, pad_id, device, amp, width=None, rows=None):
    """-> (len(indices), 2): the summed reply log-probabilities of the chosen and rejected sides, computed in
    a batch of `rows` pairs padded to `width` tokens (collate). With the same width and rows for every batch,
    a pair's log-probabilities do not depend on the pairs batched with it."""
    ids, mask = collate(pairs, indices, pad_id, width, rows)
    with amp:
        logps = sequence_logps(model, ids.to(device), mask.to(device))
    return logps.view(2, -1).t()[:len(indices)]


def longest(pairs):
    """The longest side of all pairs, in tokens: every batch is padded to it."""
    return max(len(p[k]) for split in pairs.values() for p in split for k in (0, 2))


def reply_tokens(pairs):
    """-> float32 (N, 2): the number of reply tokens counted in each side's log-probability (sequence_logps)."""
    return torch.tensor([[p[1][1:].sum(), p[3][1:].sum()] for p in pairs], dtype=torch.float32).view(-1, 2)


@torch.no_grad()
def reference_logps(model, pairs, batch_size, pad_id, device, amp, rank=0, world_size=1, width=None):
    """The starting model's (N, 2) reply log-probabilities of every pair, in batches of batch_size pairs padded
    to width (the shape of the run's other batches); under DDP each process does a share and the shares are
    added up."""
    out = torch.zeros(len(pairs), 2, device=device)
    model.eval()
    for n, start in enumerate(range(0, len(pairs), batch_size)):
        if n % world_size == rank:
            indices = list(range(start, min(start + batch_size, len(pairs))))
            out[indices] = pair_logps(model, pairs, indices, pad_id, device, amp, width, batch_size)
    if world_size > 1:
        torch.distributed.all_reduce(out)
    model.train()
    return out.cpu()


# -----------------------------------------------------------------------------
# the task: pairs, loss, evaluation

def data_fingerprint(meta):
    return hashlib.sha256(json.dumps(meta['splits'], sort_keys=True).encode()).hexdigest()[:16]


def reference(run, c):
    """The reference log-probabilities: computed now (a new run) and stored in out_dir/reference.pt, or
    read back from there (a resumed run: the reference is the model the run started from)."""
    path = os.path.join(c.out_dir, 'reference.pt')
    fingerprint = data_fingerprint(run.meta)
    if run.checkpoint is not None:
        made_by = run.checkpoint.get('command')
        if made_by and made_by != 'dpo.py':  # before reference.pt, which such a run never wrote
            fail(f"{c.out_dir}/ckpt.pt was written by {made_by}, not dpo.py: start a DPO run from it with "
                 f"--init_from={c.out_dir} and another --out_dir")
        if not os.path.isfile(path):
            fail(f"{path} is missing: it holds the starting model's log-probabilities that the run compares with")
        try:  # a cut or damaged file (a full disk, a copy that stopped), or something else under its name
            ref = load_checkpoint(path, keys=('data', 'train', 'val'))
        except CheckpointError as e:
            fail(f"{e}; it holds the starting model's log-probabilities that the run compares with, so this run "
                 f"cannot resume: start the run again from the model it started from, into another --out_dir")
        if ref.get('data') != fingerprint:
            fail(f"{path} was computed on other data than {c.data_dir}: resume on the data the run started with")
        return ref
    t0 = time.time()
    ref = {split: reference_logps(run.raw_model, pairs, c.batch_size, run.pad_id, run.device, run.amp, run.rank,
                                  run.world_size, run.width) for split, pairs in run.pairs.items()}
    if not all(torch.isfinite(v).all() for v in ref.values()):
        fail(f"the starting model {c.init_from} gives non-finite log-probabilities on {c.data_dir}")
    ref.update(data=fingerprint, init_from=c.init_from, width=run.width, batch_size=c.batch_size)
    if run.rank == 0:
        save_atomic(ref, path)
    print0(f"reference log-probabilities of {len(run.pairs['train']):,} train and {len(run.pairs['val']):,} held-out "
           f"pairs: {time.time() - t0:.1f}s, stored in {path}")
    return ref


def check_start_template(c, meta):
    """The pairs are rendered in a chat template (data/prepare_pref.py: the --model's, or --template): a starting
    model fine-tuned on another template is refused (DPO would teach it a second format, and the result would be
    saved as speaking the pairs' one); a base model, which carries no template, gets a remark and goes on (its
    tokenizer is the data's, checked when it was loaded, so the markers are its tokens; it has just never
    learned them: DPO usually starts from the SFT model). A Hugging Face folder's template is a Jinja text that
    is not compared."""
    from mirim.chat import get_template
    from mirim.chat_data import template_markers
    from mirim.checkpoint import resolve
    data_template = meta.get('chat_template') or (meta.get('tokenizer') or {}).get('chat_template')
    if c.init_from == 'resume':
        return
    try:
        kind, where = resolve(c.init_from)
        if kind != 'mirim':
            return
        # mmap: the tokenizer's description without reading the weights a second time
        start = torch.load(where, map_location='cpu', weights_only=True, mmap=True)
        model_template = start['tokenizer'].get('chat_template')
        data_template, model_template = (get_template(t) if t else None for t in (data_template, model_template))
    except (OSError, RuntimeError, ValueError, KeyError, AttributeError):  # it loaded once: nothing more to learn
        return
    if start.get('command') == 'classify.py' or 'head' in start:
        fail(f"{c.init_from} is a classifier (classify.py): its backbone was tuned to pick labels, and its head would "
             f"be dropped. DPO starts from a chat (SFT) model: train.py on data/prepare_chat.py data")
    if not data_template:
        return
    name = lambda t: repr(t.get('name', 'custom'))  # noqa: E731
    if model_template is None:
        print0(f"note: {c.init_from} carries no chat template: a base model, never fine-tuned on conversations. The "
               f"pairs are in the {name(data_template)} template, whose markers "
               f"({' '.join(template_markers(data_template)) or 'none'}) it has not learned; DPO usually starts from "
               f"the SFT model (train.py on data/prepare_chat.py data). Going on from the base model")
    elif model_template != data_template:
        fail(f"{c.data_dir} holds pairs in the {name(data_template)} chat template, but {c.init_from} was fine-tuned "
             f"on the {name(model_template)} template: DPO would teach it a format it does not speak. Prepare the "
             f"pairs in its template: python data/prepare_pref.py --model {c.init_from} --input ... --out ...")


class Preference(Task):
    name = 'dpo.py'
    metrics = METRICS
    hint = "Try a lower learning_rate or a higher beta"

    def check_config(self, c):
        checks = [
            (c.init_from not in ('', 'scratch'), "init_from must name the fine-tuned model to start from (a "
                                                 "checkpoint, out_dir or HF folder), or be 'resume'"),
            (c.loss_type in ('sigmoid', 'ipo'), "loss_type must be 'sigmoid' or 'ipo'"),
            (c.beta > 0, "beta must be positive"),
            (0 <= c.label_smoothing < 0.5, "label_smoothing must be in [0, 0.5)"),
            (c.loss_type == 'sigmoid' or c.label_smoothing == 0, "label_smoothing applies to loss_type='sigmoid' only"),
            (c.eval_pairs >= 0, "eval_pairs must not be negative"),
        ]
        for ok, message in checks:
            if not ok:
                fail(message)

    def set_up(self, run, c):
        try:
            run.pairs = {split: read_pairs(c.data_dir, split, run.meta) for split in ('train', 'val')}
            run.tasks = read_pair_tasks(c.data_dir, 'val', run.meta)  # (names, task of each held-out pair) or None
        except (FileNotFoundError, KeyError, ValueError) as e:
            fail(f"data {c.data_dir}: {e}")
        check_start_template(c, run.meta)
        block_size = run.raw_model.config.block_size
        run.width = longest(run.pairs)  # every batch is padded to it: a pair's scores never depend on its batch
        if run.width > block_size + 1:  # the last token is only a target
            fail(f"{c.data_dir} holds sequences of {run.width} tokens, longer than the model's context "
                 f"({block_size}): prepare it again with --max_length={block_size}")
        run.reply_tokens = {split: reply_tokens(pairs) for split, pairs in run.pairs.items()}
        run.pairs_per_step = c.batch_size * c.gradient_accumulation_steps
        run.pad_id = run.tokenizer.pad_id if run.tokenizer.pad_id is not None else run.tokenizer.eos_id
        run.order = ExampleOrder(len(run.pairs['train']), c.seed)
        n_eval = lambda n: n if c.eval_pairs == 0 else min(n, c.eval_pairs)  # noqa: E731
        eval_train = torch.randperm(len(run.pairs['train']), generator=torch.Generator().manual_seed(c.seed + 1))
        run.eval_sets = {'val': list(range(n_eval(len(run.pairs['val'])))),
                         'eval_train': sorted(eval_train[:n_eval(len(run.pairs['train']))].tolist())}
        if c.init_from != 'resume':
            print0(f"starting from {c.init_from} (policy and reference)")
        run.reference = reference(run, c)

    def scores(self, run, c, model, split, indices):
        """-> (the policy's (len(indices), 2) log-probabilities of these pairs of a split, the reference's, and
        dpo_loss's (losses, chosen rewards, rejected rewards))."""
        logps = pair_logps(model, run.pairs[split], indices, run.pad_id, run.device, run.amp, run.width, c.batch_size)
        ref = run.reference[split][indices].to(run.device)
        tokens = run.reply_tokens[split][indices].to(run.device)
        return logps, ref, dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], c.beta, c.label_smoothing,
                                    c.loss_type, tokens[:, 0], tokens[:, 1])

    def micro_step(self, run, c, j):
        indices = run.order.micro_batch(run.step, j, c)
        logps, ref, (losses, chosen_rewards, rejected_rewards) = self.scores(run, c, run.model, 'train', indices)
        return losses.mean(), metrics(losses, chosen_rewards, rejected_rewards, logps, ref)

    def units_per_step(self, run, c):
        return run.pairs_per_step

    def evaluate_set(self, run, c, split):
        """METRICS averaged over the fixed pairs of run.eval_sets[split] ('val' or 'eval_train'); for 'val' when
        the pairs name their task, the reward accuracy of each task too (reward_accuracy/<task>)."""
        indices = run.eval_sets[split]
        pairs_split = 'val' if split == 'val' else 'train'
        tasks = run.tasks if split == 'val' else None
        task_of = torch.tensor(tasks[1], device=run.device) if tasks else None
        n_tasks = len(tasks[0]) if tasks else 0

        def batch_sums(start, stop):  # METRICS' sums, then the wins (chosen reward higher) of each task
            batch = indices[start:stop]
            logps, ref, (losses, chosen_rewards, rejected_rewards) = self.scores(run, c, run.raw_model, pairs_split,
                                                                                 batch)
            wins = torch.zeros(n_tasks, device=run.device)
            if tasks:
                wins.index_add_(0, task_of[batch], (chosen_rewards > rejected_rewards).float())
            return torch.cat([metrics(losses, chosen_rewards, rejected_rewards, logps, ref), wins])
        both = sum_over_batches(run, len(indices), c.batch_size, len(METRICS) + n_tasks, batch_sums)
        total, wins = both[:len(METRICS)], both[len(METRICS):]
        prefix = 'val_' if split == 'val' else 'eval_train_'
        found = {prefix + name: v / len(indices) for name, v in zip(METRICS, total.tolist())}
        if tasks:
            counts = torch.bincount(torch.tensor([tasks[1][i] for i in indices]), minlength=len(tasks[0])).tolist()
            found.update({f"{prefix}reward_accuracy/{name}": w / n
                          for name, w, n in zip(tasks[0], wins.tolist(), counts) if n})
        return found

    def evaluate(self, run, c):
        return {**self.evaluate_set(run, c, 'val'), **self.evaluate_set(run, c, 'eval_train')}

    def progress(self, run):
        return {'pairs': run.step * run.pairs_per_step}

    def step_text(self, m):
        return f"loss {m['loss']:.4f} | reward accuracy {m['reward_accuracy']:.1%} | margin {m['reward_margin']:.3f}"

    def eval_text(self, found):
        per_task = ', '.join(f"{key.split('/', 1)[1]} {v:.1%}" for key, v in found.items()
                             if key.startswith('val_reward_accuracy/'))
        return (f"held-out loss {found['val_loss']:.4f}, reward accuracy {found['val_reward_accuracy']:.1%}"
                + (f" ({per_task})" if per_task else "") + f", margin {found['val_reward_margin']:.3f} | train "
                f"pairs: loss {found['eval_train_loss']:.4f}, accuracy {found['eval_train_reward_accuracy']:.1%}")

    def describe(self, run, c):
        tasks = f"; tasks: {', '.join(run.tasks[0])}" if run.tasks else ""
        return [f"data: {c.data_dir}: {len(run.pairs['train']):,} train pairs, {len(run.pairs['val']):,} held-out"
                f"{tasks}; {run.pairs_per_step} pairs a step, {c.max_iters} steps; every batch padded to "
                f"{run.width} tokens (the longest sequence)"]

    def checkpoint_state(self, run, c):
        return {'dpo': {'init_from': c.init_from, 'beta': c.beta, 'loss_type': c.loss_type}}


def main(argv):
    train(Preference(), DEFAULTS, argv, help_source=(__file__, train_config.__file__))


if __name__ == '__main__':
    main(sys.argv[1:])
