# The CPU demo: a 4-layer, 256-wide Llama on the Portuguese Bible, about 7 minutes on 2 quiet cores.
# It always runs its whole schedule (no max_time), so the model the quick start samples is finished;
# on a busy or slower machine it takes longer. Add --max_time=SECONDS to cap it (then resume).
#   python data/biblia/prepare.py --lang pt       # -> data/biblia/pt/ (SentencePiece 4096, ~1M tokens)
#   python train.py config/train_biblia_pt.py
#   python sample.py --out_dir=out/biblia-pt --start="No princípio"
out_dir = 'out/biblia-pt'
data_dir = 'data/biblia/pt'
model = 'demo'                  # 4 layers, width 256, 8 heads (4 kv), GeGLU, tied embeddings: 3.9M parameters
block_size = 256
batch_size = 8                  # 2,048 tokens a step: small steps, many of them, suit a small model
max_iters = 600                 # ~1.2M tokens, a little over one epoch
optimizer = 'muon'              # Muon for the blocks' matrices (muon_lr 0.02), AdamW for embedding and gains:
                                # 4.6-4.9% lower val bits per byte than AdamW alone, 3 seeds x 2 scripts (README: Muon)
muon_momentum = 0.9             # not the default 0.95: lower val bpb on all 6 of those runs (README: Muon)
learning_rate = 4e-3            # the AdamW part's peak: twice AdamW-alone's 2e-3 won in the sweep
min_lr = 4e-4
warmup_iters = 50
eval_interval = 100
eval_iters = 10
log_interval = 10
device = 'cpu'
