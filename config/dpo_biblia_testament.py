# On-policy DPO of the Portuguese chat demo on the testament question: pairs from the SFT model's own wrong
# greedy answers on training-book verses (rejected), the right testament chosen, as many pairs for each
# right answer. data/biblia/demo.sh runs it, its control and the scoring for 3 seeds.
#   python data/biblia/make_tasks.py questions       # -> data/biblia/pt-questions/{train,test}.jsonl
#   python data/biblia/make_tasks.py pref --from_model out/biblia-pt-chat --out data/biblia/pt-pref-testament
#   python dpo.py config/dpo_biblia_testament.py
#   python data/biblia/exact_match.py --model out/biblia-pt-dpo-testament --before out/biblia-pt-chat
out_dir = 'out/biblia-pt-dpo-testament'
data_dir = 'data/biblia/pt-pref-testament'
init_from = 'out/biblia-pt-chat'  # the SFT model that answered: the policy starts here and it is the reference
beta = 0.1
batch_size = 8                    # pairs a step: 16 sequences of ~40-100 tokens
learning_rate = 5e-5              # the control (config/control_biblia_testament.py) uses the same schedule
min_lr = 5e-6
warmup_iters = 10
max_iters = 50                    # 400 pairs: a few epochs of the pairs a 4M model's mistakes on 3,000 questions give
eval_interval = 50                # one evaluation at the end (and step 0)
eval_pairs = 0                    # all held-out pairs
log_interval = 10
device = 'cpu'
