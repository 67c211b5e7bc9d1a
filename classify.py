"""
Fine-tune a mirim model (or a Hugging Face Llama folder) as a text classifier.

    python data/biblia/make_tasks.py classify      # verse -> book group, JSONL in data/biblia/pt-classify/
    python classify.py config/classify_biblia_pt.py
    python classify.py --init_from=out/x --train_file=train.jsonl --test_file=test.jsonl --out_dir=out/x-cls

Data: JSONL, one example per line, {"text": "...", "label": "..."} or, for sentence pairs
(entailment, paraphrase), {"text": "...", "text_pair": "...", "label": ...}; the field names are
config keys. Labels are strings or integers; the classes are the labels of the train file.

Model: the pre-trained model reads <bos> text <eos> (a pair: <bos> text <eos> <bos> text_pair <eos>,
two documents as in pre-training), and a linear head reads its final hidden state at the last
token, which has seen the whole input (right padding comes after it, so causal attention never
sees the padding). By default every weight is trained, the backbone with a small learning rate;
freeze_backbone=True trains the head alone (a linear probe: fast, and a measure of what
pre-training learned).

Training is the run skeleton every training command shares (mirim/run.py, as train.py and dpo.py):
the out_dir is claimed (a second run never writes over a classifier.pt), Ctrl-C or SIGTERM saves and
exits, --init_from=resume continues exactly, torchrun runs it on several processes, and log.jsonl
records the loss and accuracy. A share of the train file (val_fraction, whole examples, seeded) is held
out: its loss and accuracy are logged once an epoch and pick best.pt; the test file is scored once, at
the end, by the final model, so no choice is ever made on it.

Output: accuracy, macro F1 (the mean of the per-label F1, so every label counts the same however
rare) and the majority-class baseline on the test file, printed and saved to out_dir/results.json,
and out_dir/classifier.pt: a mirim checkpoint (mirim.checkpoint.load_model reads it) plus the head and
the label names; load_classifier() and predict() below use it.
"""

import math
import os
import sys
from contextlib import nullcontext
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from mirim.atomic import save_atomic, write_json
from mirim.checkpoint import FORMAT_VERSION, MODEL_KEYS, load_checkpoint, load_model, model_from_checkpoint, resolve
from mirim.common import fail, print0
from mirim.configurator import checked
from mirim import train_config
from mirim.run import ExampleOrder, Task, run_task, sum_over_batches, train
from mirim.tokenizer import load_tokenizer

# every run setting train.py has (mirim/train_config.py: logging, batch, optimizer, schedule, system;
# `python classify.py --help` lists them all), with a classifier's values where they differ, and its own
DEFAULTS = dict(
    train_config.RUN_DEFAULTS,
    init_from='out/biblia-pt',    # a mirim checkpoint (file, or out_dir holding ckpt.pt) or a Hugging Face Llama
                                  # folder; 'resume' continues out_dir/ckpt.pt
    train_file='data/biblia/pt-classify/train.jsonl',
    test_file='data/biblia/pt-classify/test.jsonl',
    text_field='text',
    text_pair_field='text_pair',  # used when the records have it
    label_field='label',
    val_fraction=0.1,             # share of the train file held out (whole examples, seeded) for best.pt and the log
    out_dir='out/biblia-pt-classify',
    freeze_backbone=False,        # True: train only the head (a linear probe)
    epochs=3,
    max_iters=0,                  # optimizer steps in all; 0 = epochs over the train examples
    eval_interval=0,              # steps between evaluations (each also saves ckpt.pt); 0 = once an epoch
    batch_size=32,                # examples per micro-batch, per process
    learning_rate=1e-4,           # the pre-trained weights: small, so fine-tuning does not wreck them
    head_learning_rate=1e-3,      # the new head
    muon_lr=1e-3,                 # optimizer='muon': the block matrices' learning rate (untuned; pre-training's is 0.02)
    weight_decay=0.01,
    beta2=0.999,
    warmup_fraction=0.1,          # linear warmup over this share of the steps, then linear decay to min_lr
    lr_schedule='linear',         # after the warmup: 'linear' | 'cosine' | 'wsd' | 'constant' (mirim/optim.py)
    min_lr=0.0,
    max_length=0,                 # tokens per example, <bos>/<eos> included; longer ones are cut; 0 = the model's context
)


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, the line and the problem."""


# -----------------------------------------------------------------------------
# data

def read_examples(path, text_field='text', text_pair_field='text_pair', label_field='label'):
    """-> [(text, text_pair or None, label)]; DataError naming path:line for anything malformed."""
    from mirim.corpus import jsonl_records
    if not os.path.isfile(path):
        raise DataError(f"{path} not found" + (": build the demo data with python data/biblia/make_tasks.py classify"
                                                if 'biblia' in path else ""))
    examples = []
    for where, record in jsonl_records(path, DataError):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        text, pair, label = record.get(text_field), record.get(text_pair_field), record.get(label_field)
        if not isinstance(text, str):
            raise DataError(f"{where}: no string field {text_field!r} (fields: {', '.join(record) or 'none'}); "
                            f"set text_field to the field that holds the text")
        if pair is not None and not isinstance(pair, str):
            raise DataError(f"{where}: {text_pair_field!r} must be a string")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{where}: field {label_field!r} must be a string or an integer label, got {label!r}")
        examples.append((text, pair, label))
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def encode_example(tokenizer, text, pair, max_length):
    """<bos> text <eos> [<bos> pair <eos>], the texts cut (the longer first) to fit max_length."""
    a, b = tokenizer.encode(text), tokenizer.encode(pair) if pair is not None else None
    room = max_length - (2 if b is None else 4)
    if room < 2:
        raise ValueError(f"max_length={max_length} leaves no room for text")
    while len(a) + len(b or []) > room:
        if b and len(b) >= len(a):
            b = b[:-1]
        else:
            a = a[:-1]
    ids = [tokenizer.bos_id] + a + [tokenizer.eos_id]
    return ids if b is None else ids + [tokenizer.bos_id] + b + [tokenizer.eos_id]


def padded(batch, pad_id):
    """[ids] -> (idx (B, T) right-padded, lengths (B,))"""
    lengths = torch.tensor([len(ids) for ids in batch])
    idx = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)
    for row, ids in enumerate(batch):
        idx[row, :len(ids)] = torch.tensor(ids)
    return idx, lengths


# -----------------------------------------------------------------------------
# the model: a pre-trained Llama and a linear head on its last token

class Classifier(nn.Module):
    def __init__(self, backbone, num_labels, bias=False):
        super().__init__()
        self.backbone = backbone
        # no bias: transformers' LlamaForSequenceClassification has none, so export.py carries the
        # head over exactly (bias=True only reads classifiers saved before)
        self.head = nn.Linear(backbone.config.n_embd, num_labels, bias=bias)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, idx, lengths):
        hidden = self.backbone.hidden_states(idx)                         # (B, T, n_embd)
        last = hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1]
        return self.head(last.float())                                    # (B, num_labels)


def load_backbone(path, device='cpu'):
    """-> (Llama in float32, Tokenizer) from a mirim checkpoint (file or out_dir) or a Hugging Face Llama folder."""
    model, tokenizer, _ = load_model(path, device=device, dtype=torch.float32)
    return model, tokenizer


# -----------------------------------------------------------------------------
# metrics

def scores(golds, preds, num_labels):
    """accuracy, balanced accuracy (the mean recall over the labels in the test set, as scikit-learn's
    balanced_accuracy_score: any constant answer scores 1 / labels), macro F1 and per-label precision /
    recall / F1 / support, as scikit-learn computes them
    (zero_division=0): a label that is true or predicted but never both scores F1 0; macro F1 averages over
    the labels present in the gold or predicted labels, so a label absent from both (not in this test set,
    never predicted) is left out of the mean rather than counted as 0 (its per-label entry reads 0, support 0)."""
    confusion = [[0] * num_labels for _ in range(num_labels)]  # [gold][predicted]
    for g, p in zip(golds, preds):
        confusion[g][p] += 1
    per_label = []
    for k in range(num_labels):
        tp = confusion[k][k]
        predicted = sum(confusion[g][k] for g in range(num_labels))
        support = sum(confusion[k])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label.append({'precision': precision, 'recall': recall, 'f1': f1, 'support': support})
    accuracy = sum(g == p for g, p in zip(golds, preds)) / max(len(golds), 1)
    present = sorted(set(golds) | set(preds))
    macro_f1 = sum(per_label[k]['f1'] for k in present) / len(present) if present else 0.0
    tested = [k for k in range(num_labels) if per_label[k]['support']]
    balanced = sum(per_label[k]['recall'] for k in tested) / len(tested) if tested else 0.0
    return {'accuracy': accuracy, 'balanced_accuracy': balanced, 'macro_f1': macro_f1,
            'per_label': per_label, 'confusion': confusion}


@torch.no_grad()
def predict_ids(classifier, encoded, batch_size, pad_id, device, amp=nullcontext()):
    """Predicted label indices for encoded examples, in order."""
    classifier.eval()
    preds = []
    for start in range(0, len(encoded), batch_size):
        idx, lengths = padded(encoded[start:start + batch_size], pad_id)
        with amp:
            logits = classifier(idx.to(device), lengths.to(device))
        preds.extend(logits.argmax(-1).tolist())
    return preds


# -----------------------------------------------------------------------------
# training: the classifier's part of the run skeleton

def split_off(examples, fraction, seed):
    """-> (train, held out): round(fraction * N) examples, at least one when fraction > 0, drawn by seed."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n = max(1, round(fraction * len(examples))) if fraction > 0 else 0
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


class Classification(Task):
    name = 'classify.py'
    metrics = ('train_loss', 'train_accuracy')
    hint = "Try a lower learning_rate / head_learning_rate"

    def check_config(self, c):
        checks = [(c.epochs >= 1, "epochs must be at least 1"),
                  (c.batch_size >= 1 and c.gradient_accumulation_steps >= 1,
                   "batch_size and gradient_accumulation_steps must be at least 1"),
                  (c.head_learning_rate >= 0, "head_learning_rate must not be negative"),
                  (0 <= c.warmup_fraction <= 1, "warmup_fraction must be between 0 and 1"),
                  (0 < c.val_fraction < 1, "val_fraction must be in (0, 1): best.pt is chosen on held-out examples"),
                  (c.max_length >= 0, "max_length must not be negative (0 = the model's context)"),
                  (c.max_iters >= 0 and c.eval_interval >= 0, "max_iters and eval_interval must not be negative")]
        for ok, message in checks:
            if not ok:
                fail(message)
        try:
            fields = (c.text_field, c.text_pair_field, c.label_field)
            train_examples, test = read_examples(c.train_file, *fields), read_examples(c.test_file, *fields)
        except (DataError, OSError) as e:
            fail(str(e))
        self.labels = sorted({label for _, _, label in train_examples}, key=lambda x: (isinstance(x, str), x))
        if len(self.labels) < 2:
            fail(f"{c.train_file}: every example has the label {self.labels[0]!r}; a classifier needs two or more")
        unseen = sorted({str(label) for _, _, label in test if label not in self.labels})
        if unseen:
            fail(f"{c.test_file} has labels that {c.train_file} never has: {', '.join(unseen)}")
        self.examples = dict(zip(('train', 'val'), split_off(train_examples, c.val_fraction, c.seed)), test=test)
        # the schedule in steps, from epochs and shares (a resumed run keeps the values its config.json has)
        steps_per_epoch = math.ceil(len(self.examples['train']) / (c.batch_size * c.gradient_accumulation_steps))
        c.max_iters = c.max_iters or c.epochs * steps_per_epoch
        c.eval_interval = c.eval_interval or steps_per_epoch
        c.warmup_iters = int(c.warmup_fraction * c.max_iters)

    def load_start(self, c):
        if c.init_from == 'resume':
            path = os.path.join(c.out_dir, 'ckpt.pt')
            if not os.path.exists(path):
                fail(f"init_from='resume' but {path} does not exist")
            try:
                checkpoint = load_checkpoint(path, keys=MODEL_KEYS + ('head', 'labels'))
            except ValueError as e:
                fail(f"{e}; resume a classifier with classify.py")
            if checkpoint['labels'] != self.labels:
                fail(f"{path} was trained on the labels {checkpoint['labels']}, {c.train_file} has {self.labels}")
            try:
                backbone, tokenizer = (model_from_checkpoint(checkpoint, c.dropout, path),
                                       load_tokenizer(checkpoint['tokenizer']))
            except ValueError as e:
                fail(str(e))
            classifier = Classifier(backbone, len(self.labels))
            classifier.head.load_state_dict(checkpoint['head'])
            return classifier, tokenizer, None, checkpoint
        try:
            backbone, tokenizer, start = load_model(c.init_from, dtype=torch.float32)
        except (OSError, ValueError) as e:
            fail(str(e))
        if tokenizer is None:
            fail(f"{c.init_from} has no tokenizer mirim can read")
        torch.manual_seed(c.seed)  # the head's initial weights
        classifier = Classifier(backbone, len(self.labels), bias='bias' in start.get('head', {})).train()
        if 'head' in start:
            self.continue_head(c, start, classifier)
        return classifier, tokenizer, None, None

    def continue_head(self, c, start, classifier):
        """init_from names a classifier (a classifier.pt, or a classify.py out_dir's ckpt.pt): with the same labels, its
        head goes on training, as the backbone does (a fresh optimizer); with other labels its head fits nothing here,
        and a new head on its backbone would throw away what the run learned without a word: refused."""
        labels = start.get('labels')
        if labels == self.labels:
            classifier.head.load_state_dict(start['head'])
            print0(f"{c.init_from} is a classifier of these labels: its head goes on training with the backbone "
                   f"(optimizer fresh)")
            return
        started = (start.get('config') or {}).get('init_from')
        backbone = f" (that run started from {started})" if started and started != 'resume' else ""
        fail(f"{c.init_from} is a classifier of the labels {labels}, not of {self.labels} ({c.train_file}): its head "
             f"cannot go on. To continue that run, use --init_from=resume with its out_dir; for a classifier of these "
             f"labels, start from a backbone checkpoint (a train.py run){backbone}")

    def set_up(self, run, c):
        backbone = run.raw_model.backbone
        self.max_length = min(c.max_length or backbone.config.block_size, backbone.config.block_size)
        run.pad_id = run.tokenizer.pad_id if run.tokenizer.pad_id is not None else run.tokenizer.eos_id
        label_index = {label: k for k, label in enumerate(self.labels)}
        try:
            run.data = {split: ([encode_example(run.tokenizer, t, p, self.max_length) for t, p, _ in examples],
                                [label_index[label] for _, _, label in examples])
                        for split, examples in self.examples.items()}
        except ValueError as e:
            fail(str(e))
        run.order = ExampleOrder(len(run.data['train'][0]), c.seed)
        run.examples_per_step = c.batch_size * c.gradient_accumulation_steps
        if c.freeze_backbone:
            backbone.requires_grad_(False)

    def optimizer_groups(self, run, c):
        return [{'params': list(run.raw_model.head.parameters()), 'lr': c.head_learning_rate}]

    def micro_step(self, run, c, j):
        rows = run.order.micro_batch(run.step, j, c)
        ids, labels = run.data['train']
        idx, lengths = padded([ids[i] for i in rows], run.pad_id)
        y = torch.tensor([labels[i] for i in rows], device=run.device)
        with run.amp:
            logits = run.model(idx.to(run.device), lengths.to(run.device))
        loss = F.cross_entropy(logits.float(), y)
        return loss, torch.stack([loss.detach() * len(rows), (logits.argmax(-1) == y).sum().float()])

    def units_per_step(self, run, c):
        return run.examples_per_step

    def evaluate(self, run, c):
        ids, labels = run.data['val']

        def batch_sums(start, stop):  # summed loss, correct answers
            idx, lengths = padded(ids[start:stop], run.pad_id)
            y = torch.tensor(labels[start:stop], device=run.device)
            with run.amp:
                logits = run.raw_model(idx.to(run.device), lengths.to(run.device)).float()
            return torch.stack([F.cross_entropy(logits, y, reduction='sum'), (logits.argmax(-1) == y).sum()])
        total = sum_over_batches(run, len(ids), c.batch_size, 2, batch_sums)
        if c.freeze_backbone:
            run.raw_model.backbone.eval()  # no dropout in a frozen feature extractor
        loss, correct = total.tolist()
        return {'val_loss': loss / len(ids), 'val_accuracy': correct / len(ids)}

    def progress(self, run):
        return {'examples': run.step * run.examples_per_step}

    def step_text(self, m):
        return f"loss {m['train_loss']:.4f} | accuracy {m['train_accuracy']:.3f}"

    def eval_text(self, found):
        return f"held-out loss {found['val_loss']:.4f}, accuracy {found['val_accuracy']:.3f}"

    def describe(self, run, c):
        return [f"classify: {len(self.examples['train']):,} train / {len(self.examples['val']):,} held-out / "
                f"{len(self.examples['test']):,} test examples, {len(self.labels)} labels "
                f"({', '.join(map(str, self.labels))}); "
                + ('head only (backbone frozen)' if c.freeze_backbone else 'all weights')
                + f"; {c.max_iters} steps of {run.examples_per_step} examples"]

    def checkpoint_state(self, run, c):
        return {'head': run.raw_model.head.state_dict(), 'labels': self.labels,
                'classify': {'max_length': self.max_length}}

    def finish(self, run, c):
        """Score the test file with the final model; write classifier.pt and results.json."""
        ids, golds = run.data['test']
        preds = predict_ids(run.raw_model, ids, c.batch_size, run.pad_id, run.device, run.amp)
        result = scores(golds, preds, len(self.labels))
        train_labels = run.data['train'][1]
        majority = max(set(train_labels), key=train_labels.count)
        result['majority_baseline'] = sum(y == majority for y in golds) / len(golds)
        result.update(labels=self.labels, test_examples=len(golds), train_examples=len(train_labels),
                      config=vars(c))
        print0('\n'.join(result_lines(result)))
        backbone = run.raw_model.backbone
        save_atomic({'model': backbone.state_dict(), 'model_config': asdict(backbone.config),
                     'tokenizer': run.tokenizer.to_dict(), 'head': run.raw_model.head.state_dict(),
                     'format_version': FORMAT_VERSION,
                     'labels': self.labels, 'config': vars(c),
                     'classify': {'accuracy': result['accuracy'], 'balanced_accuracy': result['balanced_accuracy'],
                                  'macro_f1': result['macro_f1'],
                                  'max_length': self.max_length}}, os.path.join(c.out_dir, 'classifier.pt'))
        write_json(os.path.join(c.out_dir, 'results.json'), result)
        print0(f"saved {c.out_dir}/classifier.pt and results.json")
        run.result = result


def train_classifier(cfg):
    """Fine-tune on cfg['train_file'] (the settings not given take DEFAULTS), score cfg['test_file'], save
    out_dir/classifier.pt and results.json. -> the results dict. A setting or data that cannot be used
    exits with its one-line message, as the command does; an unknown key or a wrong type is a ConfigError
    (the configurator's check, with its suggestion)."""
    settings = {**DEFAULTS, **{key: checked(DEFAULTS, key, value, 'train_classifier') for key, value in cfg.items()}}
    return run_task(Classification(), SimpleNamespace(**settings)).result


def result_lines(result):
    lines = [f"test: {result['test_examples']:,} examples: accuracy {result['accuracy']:.4f}, balanced accuracy "
             f"{result['balanced_accuracy']:.4f}, macro F1 {result['macro_f1']:.4f} (majority class: accuracy "
             f"{result['majority_baseline']:.4f}, balanced accuracy {1 / max(sum(1 for x in result['per_label'] if x['support']), 1):.4f})",
             f"  {'label':<20} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for label, s in zip(result['labels'], result['per_label']):
        lines.append(f"  {str(label):<20} {s['precision']:>9.3f} {s['recall']:>7.3f} {s['f1']:>7.3f} {s['support']:>8}")
    return lines


# -----------------------------------------------------------------------------
# using a trained classifier

def load_classifier(path, device='cpu'):
    """-> (Classifier in eval mode, tokenizer, labels, max_length) from a classifier.pt (or its out_dir)."""
    from mirim.tokenizer import load_tokenizer
    _, path = resolve(path, 'classifier.pt')
    checkpoint = load_checkpoint(path, keys=MODEL_KEYS + ('head', 'labels', 'classify'))
    backbone = model_from_checkpoint(checkpoint, where=path)
    classifier = Classifier(backbone, len(checkpoint['labels']), bias='bias' in checkpoint['head'])
    classifier.head.load_state_dict(checkpoint['head'])
    return (classifier.to(device).eval(), load_tokenizer(checkpoint['tokenizer']), checkpoint['labels'],
            checkpoint['classify']['max_length'])


def predict(path_or_loaded, texts, pairs=None, batch_size=32, device='cpu'):
    """Labels for texts (and text pairs) with a saved classifier."""
    loaded = load_classifier(path_or_loaded, device) if isinstance(path_or_loaded, str) else path_or_loaded
    classifier, tokenizer, labels, max_length = loaded
    pairs = pairs if pairs is not None else [None] * len(texts)
    encoded = [encode_example(tokenizer, t, p, max_length) for t, p in zip(texts, pairs)]
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return [labels[k] for k in predict_ids(classifier, encoded, batch_size, pad_id, device)]


def main(argv):
    train(Classification(), DEFAULTS, argv, help_source=(__file__, train_config.__file__))  # --help: the comments


if __name__ == '__main__':
    main(sys.argv[1:])
