"""
Train a mirim model: one process on a laptop or a GPU, or many under torchrun, with the same file.

    python train.py config/train_biblia_pt.py                          # the CPU demo
    python train.py config/train_biblia_pt.py --batch_size=32 --max_iters=100
    torchrun --standalone --nproc_per_node=8 train.py config/ttl_160m.py

The settings, with what each one does, are in mirim/train_config.py (`python train.py --help` lists
them). Work is never lost: checkpoints are written atomically (ckpt.pt latest, best.pt best validation
loss), Ctrl-C or SIGTERM finishes the step, saves and exits cleanly, and --init_from=resume
continues exactly where the run stopped (model, optimizer, data position, random state). All of that
is the run skeleton (mirim/run.py), which dpo.py shares; this file holds what is pre-training's own:
its batches, its loss and its evaluation.

The data decides which batch every micro-step sees: micro-batch j of each step (j < the global
gradient_accumulation_steps) is drawn from its own random stream j (shards.BatchSampler with
rank=j), whichever process runs it. So one process with 8 accumulation steps and 8 processes
with one each train on the same tokens, and a run can resume on a different number of GPUs.
"""
import math
import sys

import torch

from mirim import train_config
from mirim.common import fail, print0
from mirim.run import Task, train
from mirim.shards import BatchSampler, ShardError, data_kind


@torch.no_grad()
def evaluate(model, sampler, iters, rank, world_size, device, amp):
    """Mean loss over `iters` batches that are the same at every call (the sampler is reset); under
    DDP each process takes every world_size-th batch and the sums are added up. Every process runs as
    many batches (FSDP's forward needs all of them): the last round's extra ones are not counted."""
    model.eval()
    sampler.reset()
    total = torch.zeros((), device=device)
    for i in range(-(-iters // world_size) * world_size):
        if i < iters:
            x, y = sampler.next_batch()  # every rank draws every batch, to stay in step
        if i % world_size != rank:
            continue
        with amp:
            _, loss = model(x.to(device), y.to(device), return_logits=False)
        if i < iters:
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


class Pretraining(Task):
    """Next-token prediction on token shards (pre-training, or SFT on loss-masked chat shards)."""
    name = 'train.py'
    metrics = ('train_loss',)
    hint = ("Try a lower learning_rate, a longer warmup_iters, grad_clip, or dtype='bfloat16' instead of "
            "'float16'")

    def check_config(self, c):
        train_config.check_config(c)

    def set_up(self, run, c):
        if data_kind(run.meta) == 'preference':  # next-token training on both replies learns the rejected ones too
            fail(f"{c.data_dir} holds preference pairs (data/prepare_pref.py: a chosen and a rejected reply to each "
                 f"prompt), not token shards for next-token training: train.py would learn the rejected replies as "
                 f"well. Tune on them with dpo.py --data_dir={c.data_dir} --init_from=<the SFT model>")
        config = run.raw_model.config
        run.block_size = c.block_size or config.block_size
        if run.block_size > config.block_size:
            fail(f"block_size={run.block_size} is longer than the model's context ({config.block_size} positions)")
        if c.model == 'auto' and c.init_from in ('scratch', 'resume'):
            for line in train_config.depth_dial(vars(c), run.raw_model.num_params(non_embedding=False), run.block_size,
                                                run.meta['splits']['train']['tokens']):
                print0(line)
        # micro-batch j of every step comes from stream j (see the docstring); evaluation reads fixed
        # windows of each split, from a seed of their own
        local_steps = c.gradient_accumulation_steps // run.world_size
        try:
            run.samplers = {j: BatchSampler(c.data_dir, 'train', c.batch_size, run.block_size, seed=c.seed, rank=j,
                                            world_size=c.gradient_accumulation_steps)
                            for j in range(run.rank * local_steps, (run.rank + 1) * local_steps)}
            run.eval_samplers = {split: BatchSampler(c.data_dir, split, c.batch_size, run.block_size, seed=c.seed + 1)
                                 for split in ('train', 'val')}
        except (FileNotFoundError, ShardError) as e:
            fail(str(e))
        run.tokens_per_step = c.batch_size * run.block_size * c.gradient_accumulation_steps

    def micro_step(self, run, c, j):
        x, y = run.samplers[j].next_batch()
        if run.device.startswith('cuda'):
            x, y = x.pin_memory().to(run.device, non_blocking=True), y.pin_memory().to(run.device, non_blocking=True)
        else:
            x, y = x.to(run.device), y.to(run.device)
        with run.amp:
            _, loss = run.model(x, y, return_logits=False)
        return loss, loss.detach().view(1)

    def evaluate(self, run, c):
        found = {}
        for split, sampler in run.eval_samplers.items():
            loss = evaluate(run.eval_model, sampler, c.eval_iters, run.rank, run.world_size, run.device, run.amp)
            name = 'val' if split == 'val' else 'eval_train'
            found[f'{name}_loss'], found[f'{name}_bpb'] = loss, bits_per_byte(loss, run.meta['splits'][split])
        return found

    def progress(self, run):
        return {'tokens': run.tokens_seen}

    def step_text(self, metrics):
        return f"loss {metrics['train_loss']:.4f}"

    def eval_text(self, found):
        return f"val loss {found['val_loss']:.4f}{bpb_text(found['val_bpb'])}, train loss {found['eval_train_loss']:.4f}"

    def describe(self, run, c):
        splits = run.meta['splits']
        total_tokens = run.tokens_per_step * c.max_iters
        return [f"data: {c.data_dir}: {splits['train']['tokens']:,} train tokens, {splits['val']['tokens']:,} val "
                f"tokens; tokenizer {run.tokenizer.kind}, vocab {run.meta['vocab_size']}",
                f"tokens per step: {c.batch_size} x {run.block_size} x {c.gradient_accumulation_steps} = "
                f"{run.tokens_per_step:,}; {c.max_iters} steps = {total_tokens:,} tokens "
                f"({total_tokens / splits['train']['tokens']:.1f} epochs)"]

    def restore(self, run, c, checkpoint):
        for sampler in run.samplers.values():  # every stream has drawn as many batches as stream 0
            sampler.load_state_dict(checkpoint['sampler'])

    def checkpoint_state(self, run, c):
        return {'sampler': next(iter(run.samplers.values())).state_dict()}  # all streams are at one position


def main(argv):
    train(Pretraining(), train_config.DEFAULTS, argv, help_source=train_config.__file__)


if __name__ == '__main__':
    main(sys.argv[1:])
