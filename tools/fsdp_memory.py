"""
What FSDP2 saves and costs against DDP, measured side by side in one torchrun run: per process, the bytes
of parameters, gradients and optimizer state (AdamW) each holds after a step, and the time of a training
step (forward, backward, gradient sync, optimizer), the two models' steps alternating so that the
machine's load falls on both alike.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 tools/fsdp_memory.py --model=demo --steps=20

Prints, on rank 0, one line per kind and the ratio FSDP / DDP (memory; median step time, and the spread
over rounds of 5 steps).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Llama, config_from_preset  # noqa: E402
from mirim.fsdp import shard_model, state_bytes  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--model', default='demo')
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--batch_size', type=int, default=4)
    parser.add_argument('--block_size', type=int, default=128)
    args = parser.parse_args()
    torch.distributed.init_process_group('gloo')
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = config_from_preset(args.model, block_size=args.block_size)
    ddp = torch.nn.parallel.DistributedDataParallel(Llama(config, seed=0))
    fsdp = Llama(config, seed=0)
    shard_model(fsdp, fsdp, 'cpu', torch.float32)
    models = {'ddp': (ddp, ddp.module.configure_optimizer(0.1, 1e-4, (0.9, 0.95), 'cpu')),
              'fsdp': (fsdp, fsdp.configure_optimizer(0.1, 1e-4, (0.9, 0.95), 'cpu'))}
    generator = torch.Generator().manual_seed(rank)
    times = {name: [] for name in models}
    for step in range(args.steps + 1):  # step 0 warms up (allocations, optimizer state)
        x = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size), generator=generator)
        for name, (model, optimizer) in models.items():
            torch.distributed.barrier()
            start = time.perf_counter()
            _, loss = model(x, x, return_logits=False)
            loss.backward()
            optimizer.step()
            if step == args.steps:  # the last step's gradients are kept, to be counted
                continue
            optimizer.zero_grad(set_to_none=True)
            torch.distributed.barrier()
            if step:
                times[name].append(time.perf_counter() - start)
    found = {name: state_bytes(getattr(model, 'module', model), optimizer) for name, (model, optimizer) in models.items()}
    if rank == 0:
        params = Llama(config).num_params(non_embedding=False)
        print(f"{args.model}: {params / 1e6:.2f}M parameters, {world} processes (gloo, CPU), AdamW, float32; "
              f"per process, rank 0:")
        for kind in ('parameters', 'gradients', 'optimizer'):
            d, f = found['ddp'][kind], found['fsdp'][kind]
            print(f"  {kind:<10} DDP {d / 2**20:8.2f} MiB  FSDP2 {f / 2**20:8.2f} MiB  FSDP2/DDP {f / d:.3f}")
        d, f = sum(found['ddp'].values()), sum(found['fsdp'].values())
        print(f"  {'all':<10} DDP {d / 2**20:8.2f} MiB  FSDP2 {f / 2**20:8.2f} MiB  FSDP2/DDP {f / d:.3f}")
        rounds = [statistics.median(times['fsdp'][i:i + 5]) / statistics.median(times['ddp'][i:i + 5])
                  for i in range(0, len(times['ddp']) - 4, 5)]
        print(f"  step time: DDP {statistics.median(times['ddp']) * 1e3:.1f} ms, FSDP2 "
              f"{statistics.median(times['fsdp']) * 1e3:.1f} ms (medians of {args.steps} steps); FSDP2/DDP "
              f"{min(rounds):.2f}-{max(rounds):.2f} over rounds of 5 steps")
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
