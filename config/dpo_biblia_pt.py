# DPO of the Portuguese chat demo (config/sft_biblia_pt.py) on Bible preference pairs: the right answer
# chosen, a plausible wrong one rejected (another book, the other testament, another verse of the chapter).
#   python data/biblia/make_tasks.py pref                 # -> data/biblia/pt-pref/ (2,000 + 400 held-out pairs)
#   python dpo.py config/dpo_biblia_pt.py
#   python data/biblia/exact_match.py --model out/biblia-pt-dpo   # greedy answers to held-out questions
out_dir = 'out/biblia-pt-dpo'
data_dir = 'data/biblia/pt-pref'
init_from = 'out/biblia-pt-chat'  # the SFT demo model: the policy starts here and it is the reference
beta = 0.1
batch_size = 8                    # pairs a step: 16 sequences of ~40-150 tokens
learning_rate = 5e-5              # a sixth of SFT's; a 3.9M model moves little at DPO's usual 1e-6-1e-5
min_lr = 5e-6
warmup_iters = 10
max_iters = 150                   # 1,200 pairs, 60% of the set: a few minutes on 2 cores
eval_interval = 50
eval_pairs = 0                    # all 400 held-out pairs
log_interval = 10
device = 'cpu'
