# TinyLlama-1.1B's shape and optimizer (Zhang et al. 2024, "TinyLlama: An Open-Source Small Language Model",
# arXiv:2401.02385; hf: TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T): 22 layers, width 2048, 32 heads,
# 4 kv heads, SwiGLU 5632, vocab 32000, context 2048, untied: 1,100,048,384 parameters (model.py's preset
# 'tinyllama-1.1b'). From the paper: AdamW (0.9, 0.95), weight decay 0.1, cosine from 4e-4 to 4e-5 after
# 2,000 warmup steps, gradient clipping 1.0, batches of ~2M tokens (here 4 x 2048 x 256 = 2,097,152).
# The Portuguese line after TeenyTinyLlama went to this size; the data is config/ttl_160m.py's.
#
# Memory (python plan.py config/tinyllama_1b.py --gpu=A100 --gpu_memory=40): 17.6 GB of fp32 weights,
# gradients and AdamW state plus ~22 GB of bf16 activations at batch_size=4 do not fit a 40 GB A100 with
# DDP: plan.py says FSDP2 over 2 GPUs or more (over 8: 2.2 GB of the states per GPU). On an 80 GB H100 DDP fits.
#
#     torchrun --standalone --nproc_per_node=8 train.py config/tinyllama_1b.py
#
# Untested on GPUs: mirim's FSDP2 path is tested on CPUs (gloo) only (README: Models larger than one GPU).
out_dir = 'out/tinyllama-1b'
data_dir = 'data/pt-corpus'
model = 'tinyllama-1.1b'
parallel = 'fsdp'
block_size = 2048
batch_size = 4
gradient_accumulation_steps = 256   # over all processes: 32 per GPU on 8 GPUs
max_iters = 10_000                  # ~21B tokens, ~19 per parameter (Chinchilla); TinyLlama itself trained 3T
learning_rate = 4e-4
min_lr = 4e-5
lr_schedule = 'cosine'
warmup_iters = 2_000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
eval_interval = 250
eval_iters = 50
log_interval = 10
dtype = 'auto'
compile = False
