# The control of config/dpo_biblia_testament.py: the same SFT model, trained by train.py on the chosen replies
# of the same pairs alone (make_tasks.py chosen), at equal steps, batch and learning-rate schedule. DPO's
# claim stands only where it beats this by more than the spread over seeds.
#   python data/biblia/make_tasks.py chosen --pairs data/biblia/pt-pref-testament --out data/biblia/pt-chosen-testament
#   python train.py config/control_biblia_testament.py
out_dir = 'out/biblia-pt-control-testament'
data_dir = 'data/biblia/pt-chosen-testament'
init_from = 'out/biblia-pt-chat'
block_size = 80                   # a question and its answer average ~77 tokens: ~8 answers a step, as DPO's 8 pairs
batch_size = 8
learning_rate = 5e-5              # DPO's schedule
min_lr = 5e-6
warmup_iters = 10
max_iters = 50                    # DPO's steps
weight_decay = 0.0                # DPO's
eval_interval = 50
eval_iters = 10
log_interval = 10
device = 'cpu'
