"""
Models larger than one GPU: FSDP2 (torch.distributed.fsdp.fully_shard) and its sharded checkpoints
(torch.distributed.checkpoint, DCP). The run skeleton (mirim/run.py) calls these when parallel='fsdp'.

Sharding. Under torchrun each transformer block is one fully_shard unit and the root (embedding,
final norm, LM head, a classifier's head) another: every process keeps 1/N of each parameter, its
gradient and its optimizer state; a block's whole weights exist only while the block runs (all-gathered
before its forward and its backward, freed after), and its gradients are reduce-scattered, averaged over
the processes. On CUDA in bfloat16 the gathered weights are cast to bf16 for compute while the reduction
and the kept (master) weights stay float32. One process is never sharded: it trains as it always does.

Muon is refused (mirim/run.py): its Newton-Schulz step needs each whole matrix. Run on FSDP's DTensors as
it is, its products gather what they need, but with a bf16 Newton-Schulz the reordered sums differ from one
process by more than float rounding (6e-5 relative in the loss at step 3, measured; AdamW's steps agree to
float rounding), and an optimizer that writes into views of a parameter's rows would not be handed the
whole matrix. Doing it right means gathering each matrix, one at a time, for its step, and writing back
each process's rows.

Activation checkpointing (checkpoint_blocks) keeps only each block's input and computes the rest again in
the backward pass: about a third more compute for activations of one block instead of all.

Checkpoints. A run with parallel='fsdp' saves out_dir/ckpt.dcp (and best.dcp), a symbolic link to a
folder sharded/step-NNNNNNNN that holds each process's part of the model and optimizer state (DCP files
named by parameter, so any number of processes reads them back) and run.pt, the rest of what ckpt.pt
holds (step, data position, every process's random state, the config, the tokenizer). A save writes the
folder as sharded/step-NNNNNNNN.tmp, renames it, then swaps the link (an atomic rename): a crash at any
point leaves the link at the previous complete folder. Folders no link names are removed after a save.
read_sharded turns such a folder, in one process, into the dict a ckpt.pt holds (without the optimizer),
which is how sample.py, eval.py, export.py and consolidate.py read it (mirim/checkpoint.load_checkpoint).
"""
import functools
import os
import shutil
import warnings
from contextlib import contextmanager

import torch

from mirim.atomic import fsync_dir, save_atomic
from mirim.out_dir import SHARDED_DIR, remove_unlinked_shards

RUN_FILE = 'run.pt'  # in a sharded checkpoint folder: everything but the model's and optimizer's tensors


@contextmanager
def one_process_quietly():
    """DCP in a single process warns that it assumes so, once per call: that is what mirim means."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')
        yield


def local(t):
    """A DTensor's part on this process; a plain tensor as it is."""
    return t.to_local() if hasattr(t, 'to_local') else t


# -----------------------------------------------------------------------------
# the model

def checkpointed_forward(block, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint
    return checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(llama):
    """Activation checkpointing for each of llama.layers: its forward keeps only its input and is run
    again in the backward pass. The parameter names stay the same (no wrapper module)."""
    for block in llama.layers:
        block.forward = functools.partial(checkpointed_forward, block)


def shard_model(model, llama, device, dtype):
    """fully_shard each block of llama.layers, then the root `model` (llama itself, or a module holding it
    as .backbone), in place: its parameters become DTensors sharded over the processes' first dimension.
    On CUDA in bf16: compute in bf16, gradients reduced and master weights kept in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy()
    if device.startswith('cuda') and dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in llama.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def weights_finite(model, world_size):
    """Every weight of every process finite (one all-reduce when there are several processes, so all of them
    take the same decision)."""
    finite = all(bool(torch.isfinite(local(p)).all()) for p in model.parameters())
    if world_size == 1:
        return finite
    flag = torch.tensor([float(finite)], device=next(model.parameters()).device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def state_bytes(model, optimizer):
    """Bytes this process holds of parameters, gradients and optimizer state -> dict (a tied weight once)."""
    params = {id(p): p for p in model.parameters()}.values()
    size = lambda t: local(t).numel() * local(t).element_size()  # noqa: E731
    optim = sum(size(v) for state in optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {'parameters': sum(size(p) for p in params), 'gradients': sum(size(p.grad) for p in params
                                                                       if p.grad is not None),
            'optimizer': optim}


# -----------------------------------------------------------------------------
# checkpoints

def save_sharded(model, optimizer, entries, out_dir, step, improved, rank):
    """Every process writes its part of a sharded checkpoint of `model` and `optimizer`; rank 0 adds
    `entries` (run.pt), renames the folder into place and points ckpt.dcp (and best.dcp when improved)
    at it. Raises OSError (a full disk) as torch.save would."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    distributed = torch.distributed.is_initialized()
    name = f'step-{step:08d}'
    folder = os.path.join(out_dir, SHARDED_DIR, name)
    tmp = folder + '.tmp'
    if rank == 0:  # what a save killed at this step before left
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if distributed:
        torch.distributed.barrier()
    state = {'model': get_model_state_dict(model), 'optimizer': get_optimizer_state_dict(model, optimizer)}
    with one_process_quietly():  # returns once every process's part is written
        dcp.save(state, checkpoint_id=tmp, no_dist=not distributed)
    if rank != 0:
        return
    save_atomic(entries, os.path.join(tmp, RUN_FILE))
    fsync_dir(tmp)
    if os.path.isdir(folder):  # a complete folder no link names yet (a crash between rename and link)
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    fsync_dir(os.path.dirname(folder))
    for link in ('ckpt.dcp',) + (('best.dcp',) if improved else ()):
        point(os.path.join(out_dir, link), os.path.join(SHARDED_DIR, name))
    remove_unlinked_shards(out_dir)


def point(link, target):
    """Make `link` a symbolic link to `target` atomically: a new link beside it, renamed over it."""
    tmp = f"{link}.tmp{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(os.path.dirname(link))


def read_sharded(path):
    """A sharded checkpoint folder -> the dict a ckpt.pt holds: run.pt's entries and 'model', the whole
    weights read in this one process (whatever number of processes wrote them), and 'sharded': the folder
    (the optimizer state stays there, for load_sharded_optimizer). ValueError / OSError when it is not one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    if not os.path.isfile(os.path.join(path, '.metadata')) or not os.path.isfile(os.path.join(path, RUN_FILE)):
        raise ValueError(f"{path} is not a complete sharded checkpoint (it lacks .metadata or {RUN_FILE})")
    checkpoint = torch.load(os.path.join(path, RUN_FILE), map_location='cpu', weights_only=True)
    reader = FileSystemReader(path)
    entries = reader.read_metadata().state_dict_metadata
    weights = {key.split('.', 1)[1]: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in entries.items() if key.startswith('model.') and isinstance(meta, TensorStorageMetadata)}
    if not weights:
        raise ValueError(f"{path} holds no model weights")
    with one_process_quietly():
        dcp.load({'model': weights}, storage_reader=reader, no_dist=True)
    return {**checkpoint, 'model': weights, 'sharded': path}


def load_sharded_optimizer(model, optimizer, path):
    """The optimizer state of the sharded checkpoint `path`, each process reading its own part (resharded
    when the checkpoint was written by another number of processes). The param_groups' settings come
    from the checkpoint too, as with optimizer.load_state_dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    state = {'optimizer': get_optimizer_state_dict(model, optimizer)}
    with one_process_quietly():
        dcp.load(state, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())
    set_optimizer_state_dict(model, optimizer, state['optimizer'])
