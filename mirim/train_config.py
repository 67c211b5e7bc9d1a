"""
The settings of a training run (train.py's, which plan.py reads too), their checks, and the depth
dial that sizes a run from its model (model='auto'). A config file (config/*.py) or --key=value on the
command line overrides any of them; `python train.py --help` lists them with the comments below.
"""
import math

from mirim.common import fail
from mirim.sizing import human, size_run

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
zero_residual = False             # a scratch model's residual projections (attention out, MLP down) start at zero, not
                                  # normal(0, 0.02/sqrt(2*n_layer)): every block starts as the identity (README: Muon)
# batch: tokens per optimizer step = batch_size * block_size * gradient_accumulation_steps
batch_size = 16                   # sequences per micro-batch, per process
gradient_accumulation_steps = 1   # micro-batches per step over ALL processes (divided among DDP ranks)
# optimizer: AdamW, weight decay on matrices only
optimizer = 'adamw'               # 'adamw' | 'muon': Muon for the blocks' matrices, AdamW for the rest (optim.py)
learning_rate = 1e-3              # peak learning rate, reached after warmup_iters (with muon: embeddings, head, gains)
muon_lr = 0.02                    # optimizer='muon': peak learning rate of the blocks' matrices
muon_momentum = 0.95              # optimizer='muon': Nesterov momentum of the matrices
muon_ns_steps = 5                 # optimizer='muon': Newton-Schulz iterations per step (fewer: cheaper, less orthogonal)
muon_ns_dtype = 'auto'            # optimizer='muon': 'auto' (bf16 where the hardware multiplies it natively) | 'float32' | 'bfloat16'
min_lr = 1e-4                     # the schedule ends here (every group ends at the same fraction of its peak)
lr_schedule = 'cosine'            # 'cosine' | 'linear' | 'wsd' (warmup-stable-decay) | 'constant', after a linear warmup
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
compile = False                   # torch.compile the model: True | False | 'auto' = when the eager steps left would take
                                  # over 10 minutes (timed on two batches at the start; README: compile)
device_peak_flops = 0.0           # FLOP/s of one device, for MFU; 0 = look it up (A100/H100/H200 bf16) or skip MFU
seed = 1337
ddp_timeout = 300.0               # seconds a process waits for the others (torchrun) before stopping with an error
# energy and emissions (mirim/emissions.py): CodeCarbon's offline tracker, in log.jsonl and the model card
emissions = True                  # measure the run's energy (kWh) and CO2-eq; False = off
emissions_country = ''            # 3-letter ISO code of where it runs, for the grid's carbon intensity ('BRA',
                                  # 'USA', 'IND'); '' = CodeCarbon's world average
parallel = 'ddp'                  # torchrun: 'ddp' (a whole model per process) | 'fsdp' (FSDP2: each process keeps 1/N of
                                  # the weights, gradients and optimizer state; sharded checkpoints ckpt.dcp)
activation_checkpointing = False  # recompute each block's activations in the backward pass (less memory, ~1/3 more compute)

DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and k != 'DEFAULTS'
            and isinstance(v, (int, float, bool, str, type(None)))}
# the settings every training run has (mirim/run.py reads them): dpo.py and classify.py take them from
# here, documented once above, and set their own values where theirs differ
RUN_KEYS = ('out_dir', 'init_from', 'eval_interval', 'log_interval', 'wandb_log', 'wandb_project', 'wandb_run_name',
            'dropout', 'batch_size', 'gradient_accumulation_steps', 'optimizer', 'learning_rate', 'muon_lr',
            'muon_momentum', 'muon_ns_steps', 'muon_ns_dtype', 'min_lr', 'lr_schedule', 'warmup_iters', 'lr_decay_iters', 'wsd_decay_fraction',
            'weight_decay', 'beta1', 'beta2', 'grad_clip', 'max_iters', 'max_time', 'device', 'dtype', 'seed',
            'ddp_timeout', 'emissions', 'emissions_country', 'parallel', 'activation_checkpointing')
RUN_DEFAULTS = {key: DEFAULTS[key] for key in RUN_KEYS}
CHOICES = {'compile': [False, True, 'auto']}  # settings limited to a few values (mirim/run.py passes them to configure)


def depth_dial(cfg, params, block_size, corpus_tokens):
    """model='auto': set cfg's max_iters and batch_size (per micro-batch) from the model's size and the
    corpus (mirim.sizing.size_run), unless the config sets them (a value other than the default). -> the
    lines that say what was chosen and why."""
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


def check_config(c):
    """train.py's own settings (mirim.run.check_run_config checks those every run has)."""
    checks = [
        (c.model != 'auto' or (isinstance(c.depth, int) and c.depth >= 1), "model='auto' needs depth >= 1"),
        (c.tokens_per_param > 0 and c.max_epochs > 0, "tokens_per_param and max_epochs must be positive"),
        (c.eval_iters >= 1, "eval_iters must be at least 1"),
        (c.block_size is None or (isinstance(c.block_size, int) and c.block_size >= 1),
         "block_size must be a positive integer (or None: the model's)"),
        (c.vocab_size is None or (isinstance(c.vocab_size, int) and c.vocab_size >= 1),
         "vocab_size must be a positive integer (or None: the data's)"),
        (c.device_peak_flops >= 0, "device_peak_flops must not be negative (0 = look it up)"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)
