# TeenyTinyLlama-460m (Corrêa et al. 2024, arXiv:2401.16640; hf: nicholasKluge/TeenyTinyLlama-460m):
# 468.2M parameters, context 2048, 1,200,000 steps on one A100-SXM4-40GB (the card: ~280 hours),
# its evaluation table reaching 9.8B tokens = 1.2M steps x 8,192 tokens (4 sequences of 2048), about
# 1.6 passes over the 6.2B-token Pt-Corpus Instruct. The card does not give this model's learning
# rate; 3e-4 here is our choice (half the 160m's, as usual for a 3x larger model), the rest as the 160m.
#
# Plan arithmetic (estimates, not measurements): model.flops_per_token = 3.22 GFLOP, so 9.8B tokens
# = 3.2e19 FLOP: ~70 h on one A100 (312 TFLOP/s bf16) or ~22 h on one H100 SXM (989) at 40% MFU.
# Memory: ~7.5 GB of fp32 weights + grads + AdamW state, plus ~17 GB of bf16 activations and logits
# at batch_size=4: ~25 GB, fits a 40 GB A100.
#
# Data: as config/ttl_160m.py (a 32,000-piece SentencePiece tokenizer).
out_dir = 'out/ttl-460m'
data_dir = 'data/pt-corpus'
model = 'ttl-460m'
block_size = 2048
batch_size = 4
gradient_accumulation_steps = 1
max_iters = 1_200_000
learning_rate = 3e-4
min_lr = 0.0
lr_schedule = 'cosine'
warmup_iters = 12_000       # 1%, as the 160m
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
eval_interval = 5_000
eval_iters = 50
log_interval = 50
dtype = 'auto'
compile = True
