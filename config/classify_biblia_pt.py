# Fine-tune the Portuguese demo model as a classifier: which group of books a verse is from
# (Lei, Históricos, Poéticos, Profetas, Evangelhos, Cartas), 1,000 train and 200 test verses per
# label, test chapters never seen in train. A few minutes on a CPU.
#   python data/biblia/make_tasks.py classify       # -> data/biblia/pt-classify/{train,test}.jsonl
#   python classify.py config/classify_biblia_pt.py
# --task testament in make_tasks.py (and the files below) gives the two-label version.
init_from = 'out/biblia-pt'              # the pre-trained demo model (config/train_biblia_pt.py)
train_file = 'data/biblia/pt-classify/train.jsonl'
test_file = 'data/biblia/pt-classify/test.jsonl'
out_dir = 'out/biblia-pt-classify'
freeze_backbone = False                  # True: a linear probe of what pre-training learned (faster)
epochs = 3
batch_size = 32
learning_rate = 1e-4                     # the pre-trained weights
head_learning_rate = 1e-3                # the new head
