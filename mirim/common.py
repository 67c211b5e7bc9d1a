"""
What every script needs from the machine it runs on: the device, the precision, autocast, the
GPU's peak FLOP/s (for MFU), memory in use, rank-0 printing, and one way to stop with an error.

`auto` means the same everywhere (train, sample, eval, classify, bench):
    device: cuda if PyTorch sees a GPU, else mps (Apple), else cpu
    dtype:  bfloat16 on a CUDA GPU that has it, float16 on an older CUDA GPU, float32 elsewhere
"""
import os
import resource
import signal
import sys
import time
from contextlib import contextmanager, nullcontext

import torch

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

# dense bf16 tensor-core peaks (FLOP/s) from NVIDIA's data sheets (their sparse figures are 2x these);
# matched in this order against torch.cuda.get_device_name(), so 'H100 PCIe' comes before 'H100'
PEAK_FLOPS = {'H100 PCIe': 756e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12}


def fail(message):
    """Stop a command line with one error line (printed by rank 0 only, so torchrun shows it once)."""
    program = os.path.basename(sys.argv[0]) or 'mirim'
    raise SystemExit(f"{program}: error: {message}" if int(os.environ.get('RANK', 0)) == 0 else 1)


def print0(*args, **kwargs):
    """print on rank 0 only (or when not under torchrun)."""
    if int(os.environ.get('RANK', 0)) == 0:
        print(*args, **kwargs)


def resolve_device(name):
    """'auto' -> cuda, else mps, else cpu. Any other name is checked here, so that asking for a GPU
    that is not there is a clear ValueError, not an error deep inside PyTorch."""
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    kind = name.split(':')[0]
    if kind not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"device={name!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if kind == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but PyTorch sees no CUDA GPU; use --device=cpu")
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r} but MPS is not available here; use --device=cpu")
    return name


def resolve_dtype(name, device):
    """A dtype name ('auto' or a key of DTYPES) -> the torch dtype to compute in on `device`."""
    if name == 'auto':
        if device.startswith('cuda'):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected 'auto', 'float32', 'bfloat16' or 'float16'")
    if name == 'float16' and device.startswith('cpu'):
        # PyTorch's CPU kernels for float16 are slow or missing; bfloat16 halves memory just as well
        raise ValueError("dtype='float16' is for GPUs; on the CPU use 'bfloat16' (where the CPU has it) or 'float32'")
    return DTYPES[name]


def dtype_name(dtype):
    return str(dtype).replace('torch.', '')


def autocast(device, dtype):
    """The context that runs matmuls in `dtype` while weights stay float32 (nothing for float32)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.split(':')[0], dtype=dtype)


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


def training_dtype(name, device):
    """resolve_dtype for training: bf16 asked for on a CPU without native bf16 trains in float32
    instead (with a note), as emulated bf16 matmuls are 10-20x slower."""
    dtype = resolve_dtype(name, device)
    if device == 'cpu' and dtype == torch.bfloat16:
        slowdown = cpu_bf16_slowdown()
        if slowdown > 2.0:
            print0(f"note: dtype='bfloat16' asked for, but this CPU has no native bf16 (a bf16 matmul measured "
                   f"{slowdown:.1f}x slower than float32; it needs AVX512-BF16, AMX or Arm BF16): training in float32")
            return torch.float32
    return dtype


@contextmanager
def stop_signals():
    """Ctrl-C / SIGTERM inside the block: the list it yields gets the signal's name, and a training
    loop finishes its step, saves and exits. A second Ctrl-C stops at once."""
    received = []

    def on_signal(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)
    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def start_processes(device_name, accumulation, timeout):
    """This process's place in the run -> (ddp, rank, world_size, device). torchrun sets
    RANK, LOCAL_RANK and WORLD_SIZE for each process; then the process group is started (nccl on
    GPUs, gloo on CPUs) with a bounded wait for the others, and each process takes its own GPU."""
    ddp = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    rank, local_rank, world_size = (int(os.environ['RANK']), int(os.environ['LOCAL_RANK']),
                                    int(os.environ['WORLD_SIZE'])) if ddp else (0, None, 1)
    if accumulation % world_size:
        fail(f"gradient_accumulation_steps={accumulation} counts micro-batches over all {world_size} processes, "
             f"so it must be a multiple of {world_size}")
    try:
        device = resolve_device(device_name)
    except ValueError as e:
        fail(str(e))
    if device.startswith('cuda') and local_rank is not None:
        device = f'cuda:{local_rank}'  # torchrun: one GPU per process
    if ddp:
        from datetime import timedelta
        if device.startswith('cuda'):
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo',
                                             timeout=timedelta(seconds=timeout))
    return ddp, rank, world_size, device


def peer_timeout(error, rank, seconds):
    """The one line for a torchrun collective that gave up waiting (a peer crashed, froze or lost
    its node), or None when error is something else."""
    text = str(error)
    if 'timed out' not in text.lower() and 'timeout' not in text.lower():
        return None
    return (f"rank {rank}: no answer from the other processes for ddp_timeout={seconds:g} s (one of them stopped "
            f"or hangs): {text.splitlines()[0] if text else type(error).__name__}")


def peak_flops(device, dtype):
    """The device's dense peak FLOP/s in dtype, or None when unknown (CPU, fp32, an unlisted GPU)."""
    if not device.startswith('cuda') or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def memory_gb(device):
    """Peak memory of this process: allocated on the GPU, resident set on the CPU."""
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 1e9 if sys.platform == 'darwin' else peak * 1024 / 1e9
