# cucafera 244M, a Catalan Llama-style model (hf: pauhidalgoo/cucafera; code github.com/pauhidalgoo/cucafera):
# 30 layers, width 768, 8 query / 4 kv heads, GeGLU, BPE vocab 65,536, context 2048. The card: 11,007
# steps of 524,288 tokens (5.77B tokens of patufet-pretrain), lr 3e-4 with warmup. Its src/train.py:
# 8 x 2048 x 32 accumulation = 524,288 tokens a step, warmup 200 steps, cosine to 0.1 x lr over a
# 20,000-step horizon (the run stopped at 11,007), AdamW betas (0.9, 0.95), no weight decay, clip 1.0.
#
# Plan arithmetic (estimates, not measurements): model.flops_per_token = 2.04 GFLOP, so 5.77B tokens
# = 1.2e19 FLOP: ~26 h on one A100 (312 TFLOP/s bf16) or ~8.3 h on one H100 SXM (989) at 40% MFU;
# on 8 H100s about 1 h 05 min. Memory: ~4 GB of fp32 weights + grads + AdamW state, plus ~33 GB of bf16
# activations and the 65,536-wide logits at batch_size=8: ~37 GB; on 40 GB GPUs use
# --batch_size=4 --gradient_accumulation_steps=64 (same tokens per step).
#
# Data: Catalan text with a 65,536-piece tokenizer, e.g.
#   python data/prepare.py --input catalan/ --tokenizer train:65536 --out data/patufet
# gradient_accumulation_steps counts micro-batches over all GPUs, so this file runs unchanged on
# 1, 2, 4, 8, 16 or 32 GPUs (torchrun --nproc_per_node=8 train.py config/cucafera_244m.py) and sees
# the same batches on each.
out_dir = 'out/cucafera-244m'
data_dir = 'data/patufet'
model = 'cucafera-244m'
block_size = 2048
batch_size = 8
gradient_accumulation_steps = 32
max_iters = 11_007
learning_rate = 3e-4
min_lr = 3e-5
lr_schedule = 'cosine'
warmup_iters = 200
lr_decay_iters = 20_000     # the original schedule's horizon; 0 would decay fully by max_iters
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
eval_interval = 250
eval_iters = 20
log_interval = 10
dtype = 'auto'
compile = True
