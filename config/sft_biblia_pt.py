# Chat fine-tuning (SFT) of the Portuguese demo model on the Bible instruction set: "Cite Gênesis 1:3.",
# "Em que livro da Bíblia está escrito: ...?", "Qual é o versículo depois de: ...?", ...
#   python data/biblia/prepare.py --lang pt && python train.py config/train_biblia_pt.py   # the base model
#   python data/biblia/make_tasks.py chat          # -> data/biblia/pt-chat/ (ChatML, loss masks)
#   python train.py config/sft_biblia_pt.py
#   python sample.py --out_dir=out/biblia-pt-chat --chat
# The loss counts only the replies (mask shards); the val loss is on held-out books' verses.
out_dir = 'out/biblia-pt-chat'
data_dir = 'data/biblia/pt-chat'
init_from = 'out/biblia-pt'       # the pre-trained demo model; fine-tuning keeps its shape and tokenizer
block_size = 256                  # conversations average ~80 tokens, the longest ~220
batch_size = 8                    # 2,048 tokens a step, as in pre-training
learning_rate = 3e-4              # a third of pre-training's: adapt the model, do not overwrite it
min_lr = 3e-5
warmup_iters = 20
max_iters = 300                   # ~0.6M tokens, a quarter of the 2.4M-token set: 2-10 minutes on 2 cores
eval_interval = 50
eval_iters = 10
weight_decay = 0.1
