# The testament of a verse (Antigo / Novo Testamento) as a classifier, tested on the held-out books (Ruth,
# Lamentations, Joel, Jonah, Habakkuk; Philemon, Hebrews, James, Jude), which no training step saw, pre-training
# included: 1,000 train verses per label from the other books, 416 test verses per label (every Old Testament
# verse of the held-out books), so the majority class scores 50% and accuracy is balanced accuracy.
#   python data/biblia/make_tasks.py classify --task testament --split books --test_per_label 1000 \
#       --out data/biblia/pt-classify-testament-books
#   python classify.py config/classify_biblia_testament.py
init_from = 'out/biblia-pt'
train_file = 'data/biblia/pt-classify-testament-books/train.jsonl'
test_file = 'data/biblia/pt-classify-testament-books/test.jsonl'
out_dir = 'out/biblia-pt-classify-testament'
epochs = 1                               # 57 steps of 32 verses; a few minutes on a busy CPU
batch_size = 32
learning_rate = 1e-4
head_learning_rate = 1e-3
device = 'cpu'
