# TeenyTinyLlama-160m (Corrêa et al. 2024, arXiv:2401.16640; hf: nicholasKluge/TeenyTinyLlama-160m),
# the recipe from its model card and training code (github.com/Nkluge-correa/TeenyTinyLlama):
# 162.4M parameters, context 2048, 458,000 steps of 4 sequences = 8,192 tokens a step (3.75B tokens of
# the 6.2B-token Pt-Corpus Instruct), AdamW lr 6e-4 (eps 1e-8, weight decay 0.01), 1% warmup, cosine,
# bf16, one A100-SXM4-40GB (the card: ~36 hours).
#
# Plan arithmetic (estimates, not measurements): model.flops_per_token = 1.05 GFLOP, so 3.75B tokens
# = 3.9e18 FLOP: ~8.8 h on one A100 (312 TFLOP/s bf16) or ~2.8 h on one H100 SXM (989) at 40% MFU.
# Memory: ~2.6 GB of fp32 weights + grads + AdamW state (16 bytes/parameter), plus ~8 GB of bf16
# activations and logits at batch_size=4: ~11 GB, fits a 16 GB GPU.
#
# Data: a Portuguese corpus with a 32,000-piece SentencePiece tokenizer, e.g.
#   python data/prepare.py --input pt-corpus/ --tokenizer train:32000 --out data/pt-corpus
# This is the one-GPU recipe as published; under torchrun gradient_accumulation_steps must be a
# multiple of the number of GPUs (so 8 GPUs see 8x the tokens per step: raise the LR with care).
out_dir = 'out/ttl-160m'
data_dir = 'data/pt-corpus'
model = 'ttl-160m'
block_size = 2048
batch_size = 4
gradient_accumulation_steps = 1
max_iters = 458_000
learning_rate = 6e-4
min_lr = 0.0                # Hugging Face's cosine schedule (which TTL used) decays to zero
lr_schedule = 'cosine'
warmup_iters = 4_580        # warmup_ratio 0.01
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.999               # Hugging Face Trainer's default Adam betas
grad_clip = 1.0
eval_interval = 2_000
eval_iters = 50
log_interval = 50
dtype = 'auto'              # bf16 on a GPU that has it
compile = True
