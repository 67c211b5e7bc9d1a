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

Output: accuracy, macro F1 (the mean of the per-label F1, so every label counts the same however
rare) and the majority-class baseline on the test file, printed and saved to out_dir/results.json,
and out_dir/classifier.pt: a mirim checkpoint (checkpoint.load_model reads it) plus the head and the
label names; load_classifier() and predict() below use it.
"""

import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from mirim.atomic import save_atomic, write_json
from mirim.checkpoint import load_checkpoint, load_model, model_from_checkpoint, MODEL_KEYS, resolve
from mirim.common import autocast, resolve_device, resolve_dtype

DEFAULTS = dict(
    init_from='out/biblia-pt',    # a mirim checkpoint (file, or out_dir holding ckpt.pt) or a Hugging Face Llama folder
    train_file='data/biblia/pt-classify/train.jsonl',
    test_file='data/biblia/pt-classify/test.jsonl',
    text_field='text',
    text_pair_field='text_pair',  # used when the records have it
    label_field='label',
    out_dir='out/biblia-pt-classify',
    freeze_backbone=False,        # True: train only the head (a linear probe)
    epochs=3,
    batch_size=32,
    learning_rate=1e-4,           # the pre-trained weights: small, so fine-tuning does not wreck them
    head_learning_rate=1e-3,      # the new head
    optimizer='adamw',            # 'adamw' | 'muon': Muon for the backbone's block matrices (optim.py), AdamW for the rest
    muon_lr=1e-3,                 # optimizer='muon': the block matrices' learning rate (untuned; pre-training's is 0.02)
    muon_momentum=0.95,
    weight_decay=0.01,
    warmup_fraction=0.1,          # linear warmup over this share of the steps, then linear decay to 0
    grad_clip=1.0,
    max_length=0,                 # tokens per example, <bos>/<eos> included; longer ones are cut; 0 = the model's context
    device='auto',                # 'auto' (cuda, then mps, then cpu) | 'cpu' | 'cuda' | 'mps'
    seed=1337,
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
    """accuracy, macro F1 and per-label precision / recall / F1 / support; a label never predicted
    and never true scores 0, as in scikit-learn (zero_division=0)."""
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
    return {'accuracy': accuracy, 'macro_f1': sum(s['f1'] for s in per_label) / num_labels,
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
# training

def train_classifier(cfg, say=print):
    """Fine-tune on cfg['train_file'], score cfg['test_file'], save out_dir/classifier.pt and results.json.
    Returns the results dict."""
    cfg = {**DEFAULTS, **cfg}
    checks = [(cfg['epochs'] >= 1 and cfg['batch_size'] >= 1, "epochs and batch_size must be at least 1"),
              (cfg['learning_rate'] >= 0 and cfg['head_learning_rate'] >= 0 and cfg['weight_decay'] >= 0
               and cfg['grad_clip'] >= 0, "learning_rate, head_learning_rate, weight_decay and grad_clip must not be "
                                          "negative"),
              (0 <= cfg['warmup_fraction'] <= 1, "warmup_fraction must be between 0 and 1"),
              (cfg['max_length'] >= 0, "max_length must not be negative (0 = the model's context)"),
              (cfg['optimizer'] in ('adamw', 'muon'), f"optimizer={cfg['optimizer']!r}: choose 'adamw' or 'muon'")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    t0 = time.time()
    torch.manual_seed(cfg['seed'])
    device = resolve_device(cfg['device'])
    fields = (cfg['text_field'], cfg['text_pair_field'], cfg['label_field'])
    train = read_examples(cfg['train_file'], *fields)
    test = read_examples(cfg['test_file'], *fields)
    labels = sorted({label for _, _, label in train}, key=lambda x: (isinstance(x, str), x))
    if len(labels) < 2:
        raise DataError(f"{cfg['train_file']}: every example has the label {labels[0]!r}; a classifier needs two or more")
    label_index = {label: k for k, label in enumerate(labels)}
    unseen = sorted({str(label) for _, _, label in test if label not in label_index})
    if unseen:
        raise DataError(f"{cfg['test_file']} has labels that {cfg['train_file']} never has: {', '.join(unseen)}")

    backbone, tokenizer = load_backbone(cfg['init_from'], device)
    if tokenizer is None:
        raise DataError(f"{cfg['init_from']} has no tokenizer mirim can read")
    max_length = min(cfg['max_length'] or backbone.config.block_size, backbone.config.block_size)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    encode = lambda examples: [encode_example(tokenizer, t, p, max_length) for t, p, _ in examples]  # noqa: E731
    train_ids, test_ids = encode(train), encode(test)
    train_y = [label_index[label] for _, _, label in train]
    test_y = [label_index[label] for _, _, label in test]

    classifier = Classifier(backbone, len(labels)).to(device)
    if cfg['freeze_backbone']:
        backbone.requires_grad_(False)
    groups = [{'params': list(classifier.head.parameters()), 'lr': cfg['head_learning_rate']}]
    if cfg['optimizer'] == 'muon' and not cfg['freeze_backbone']:
        from mirim.optim import make_optimizer
        optimizer = make_optimizer(classifier, 'muon', cfg['learning_rate'], cfg['weight_decay'], (0.9, 0.999),
                                   device.split(':')[0], muon_lr=cfg['muon_lr'], muon_momentum=cfg['muon_momentum'],
                                   extra_groups=groups)
    else:
        if not cfg['freeze_backbone']:
            groups.append({'params': [p for p in backbone.parameters() if p.requires_grad], 'lr': cfg['learning_rate']})
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg['weight_decay'])
    for group in optimizer.param_groups:
        group['initial_lr'] = group['lr']
    amp = autocast(device, resolve_dtype('auto', device))

    steps_per_epoch = math.ceil(len(train_ids) / cfg['batch_size'])
    total_steps = steps_per_epoch * cfg['epochs']
    warmup = max(1, int(cfg['warmup_fraction'] * total_steps))
    counts = {k: train_y.count(k) for k in range(len(labels))}
    majority = max(counts, key=counts.get)
    say(f"classify: {len(train):,} train / {len(test):,} test examples, {len(labels)} labels "
        f"({', '.join(map(str, labels))}); {cfg['init_from']} ({backbone.num_params() / 1e6:.2f}M parameters "
        f"without embeddings), {'head only (backbone frozen)' if cfg['freeze_backbone'] else 'all weights'}; "
        f"{cfg['epochs']} epochs x {steps_per_epoch} steps on {device}")

    from tqdm import tqdm
    rng = random.Random(cfg['seed'])
    step = 0
    for epoch in range(cfg['epochs']):
        classifier.train()
        if cfg['freeze_backbone']:
            backbone.eval()  # no dropout in a frozen feature extractor
        order = list(range(len(train_ids)))
        rng.shuffle(order)
        total_loss, correct = 0.0, 0
        bar = tqdm(range(0, len(order), cfg['batch_size']), desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False,
                   disable=not sys.stderr.isatty())  # no bar lines in a log file
        for start in bar:
            rows = order[start:start + cfg['batch_size']]
            idx, lengths = padded([train_ids[i] for i in rows], pad_id)
            y = torch.tensor([train_y[i] for i in rows], device=device)
            # linear warmup, then linear decay to 0 (the usual schedule for fine-tuning a classifier)
            scale = min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
            for group in optimizer.param_groups:
                group['lr'] = group['initial_lr'] * scale
            with amp:
                logits = classifier(idx.to(device), lengths.to(device))
            loss = F.cross_entropy(logits.float(), y)
            if not math.isfinite(loss.item()):
                raise ValueError(f"the training loss became {loss.item()} at step {step + 1} (epoch {epoch + 1}); "
                                 f"stopped without saving. Try a lower learning_rate / head_learning_rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg['grad_clip'] > 0:
                torch.nn.utils.clip_grad_norm_(classifier.parameters(), cfg['grad_clip'])
            optimizer.step()
            step += 1
            total_loss += loss.item() * len(rows)
            correct += (logits.argmax(-1) == y).sum().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        say(f"epoch {epoch + 1}: train loss {total_loss / len(order):.4f}, train accuracy {correct / len(order):.3f} "
            f"({time.time() - t0:.0f}s)")

    preds = predict_ids(classifier, test_ids, cfg['batch_size'], pad_id, device, amp)
    result = scores(test_y, preds, len(labels))
    result['majority_baseline'] = sum(y == majority for y in test_y) / len(test_y)
    result.update(labels=labels, test_examples=len(test), train_examples=len(train), seconds=time.time() - t0,
                  config=cfg)
    say('\n'.join(result_lines(result)))

    os.makedirs(cfg['out_dir'], exist_ok=True)
    checkpoint = {'model': backbone.state_dict(), 'model_config': asdict(backbone.config),
                  'tokenizer': tokenizer.to_dict(), 'head': classifier.head.state_dict(), 'labels': labels,
                  'config': cfg, 'classify': {'accuracy': result['accuracy'], 'macro_f1': result['macro_f1'],
                                              'max_length': max_length}}
    save_atomic(checkpoint, os.path.join(cfg['out_dir'], 'classifier.pt'))
    write_json(os.path.join(cfg['out_dir'], 'results.json'), result)
    say(f"saved {cfg['out_dir']}/classifier.pt and results.json")
    return result


def result_lines(result):
    lines = [f"test: {result['test_examples']:,} examples: accuracy {result['accuracy']:.4f}, macro F1 "
             f"{result['macro_f1']:.4f} (majority class: accuracy {result['majority_baseline']:.4f})",
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
    backbone = model_from_checkpoint(checkpoint)
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
    from mirim.configurator import ConfigError, configure
    try:
        cfg = configure(DEFAULTS, argv, help_source=__file__)  # --help reads the comments in DEFAULTS
        train_classifier(cfg)
    except (ConfigError, DataError, OSError, ValueError) as e:
        sys.exit(f"classify.py: error: {e}")


if __name__ == '__main__':
    main(sys.argv[1:])
