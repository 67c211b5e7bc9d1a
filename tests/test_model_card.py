"""mirim/model_card.py through export.py: a short run -> export -> a card whose YAML parses and carries the
numbers the run logged; fine-tunes name their parent; missing facts are left out, never invented."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from mirim import model_card  # noqa: E402
from test_train import TINY, make_corpus  # noqa: E402

pytest.importorskip('transformers')
yaml = pytest.importorskip('yaml')
export = pytest.importorskip('export')

pytestmark = pytest.mark.usefixtures('one_thread')


def run(data_dir, out_dir, *args):
    train.main(TINY + [f'--data_dir={data_dir}', f'--out_dir={out_dir}', *args])


def records(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def card(dest):
    """(the YAML header as a dict, the markdown after it)"""
    with open(os.path.join(dest, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    _, header, body = text.split('---\n', 2)
    return yaml.safe_load(header), body


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(data_dir, a 6-step pre-training out_dir, a 2-step fine-tune of it, resumed once)"""
    root = tmp_path_factory.mktemp('card')
    data_dir = make_corpus(root / 'data')
    run(data_dir, root / 'base', '--max_iters=6', '--eval_interval=3', '--emissions_country=BRA')
    run(data_dir, root / 'tuned', '--max_iters=2', '--eval_interval=2', f'--init_from={root / "base"}')
    run(data_dir, root / 'tuned', '--max_iters=3', '--eval_interval=2', '--init_from=resume')
    return data_dir, str(root / 'base'), str(root / 'tuned')


def test_the_card_yaml_parses_and_carries_the_logged_emissions(trained, tmp_path):
    _, base, _ = trained
    dest = export.export(base, str(tmp_path / 'hf'))
    header, body = card(dest)
    last = records(base)[-1]
    co2 = header['co2_eq_emissions']
    assert co2['emissions'] == pytest.approx(last['emissions_kg'] * 1000, rel=1e-5)  # grams
    assert co2['source'] == 'CodeCarbon' and co2['training_type'] == 'pre-training'
    assert co2['geographical_location'] == 'Brazil (BRA)'
    assert co2['hardware_used'] == records(base)[0]['hardware']
    assert header['pipeline_tag'] == 'text-generation' and 'mirim' in header['tags']
    assert f"{last['energy_kwh']:.4g} kWh" in body


def test_the_card_reports_the_runs_numbers(trained, tmp_path):
    data_dir, base, _ = trained
    dest = export.export(base, str(tmp_path / 'hf'))
    _, body = card(dest)
    logged = records(base)
    last = logged[-1]
    ckpt = torch.load(os.path.join(base, 'ckpt.pt'), weights_only=True)
    assert f"| steps | {ckpt['step']} |" in body and f"| tokens seen | {ckpt['tokens_seen']:,} |" in body
    assert f"| final train loss | {last['train_loss']:.4f} |" in body
    assert f"| validation loss | {ckpt['val_loss']:.4f} nats/token |" in body
    assert f"| validation bits per byte | {ckpt['val_bpb']:.4f} |" in body
    assert f"| hardware | {logged[0]['hardware']} |" in body and '| started from | scratch' in body
    assert 'tokens per word' in body and '## Samples' in body
    with open(os.path.join(dest, model_card.CURVE), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert f"]({model_card.CURVE})" in body


def test_a_fine_tune_names_its_parent_even_after_a_resume(trained, tmp_path):
    _, base, tuned = trained
    header, body = card(export.export(tuned, str(tmp_path / 'hf')))
    assert header['co2_eq_emissions']['training_type'] == 'fine-tuning'
    assert f"| started from | `{base}` |" in body
    # the energy of both sessions of the fine-tune, not of its parent
    assert header['co2_eq_emissions']['emissions'] == pytest.approx(records(tuned)[-1]['emissions_kg'] * 1000, rel=1e-5)


def test_eval_results_of_this_checkpoint_are_reported_and_others_are_not(trained, tmp_path):
    import shutil
    import eval as evaluate
    _, base, _ = trained
    out = tmp_path / 'run'
    shutil.copytree(base, out)
    result = evaluate.main([f'--out_dir={out}'])
    with open(out / 'eval_old.json', 'w') as f:  # an evaluation of an earlier save of the run
        json.dump({**result, 'task': 'old_task', 'step': 3}, f)
    _, body = card(export.export(str(out), str(tmp_path / 'hf')))
    assert f"| {result['task']} | loss {result['metrics']['loss']:.4f}" in body
    assert 'old_task' not in body


def test_a_checkpoint_without_a_log_leaves_those_facts_out(trained, tmp_path):
    _, base, _ = trained
    ckpt = torch.load(os.path.join(base, 'ckpt.pt'), weights_only=True)
    (tmp_path / 'old').mkdir()
    torch.save({k: v for k, v in ckpt.items() if k != 'elapsed'}, tmp_path / 'old' / 'ckpt.pt')
    dest = export.export(str(tmp_path / 'old'), str(tmp_path / 'hf'))
    header, body = card(dest)
    assert 'co2_eq_emissions' not in header
    assert 'no log.jsonl beside the checkpoint' in body
    for row in ('wall time', 'hardware', 'final train loss', 'energy and emissions'):
        assert f"| {row} | not recorded |" in body
    assert f"| steps | {ckpt['step']} |" in body  # what the checkpoint itself holds is still there
    assert not os.path.exists(os.path.join(dest, model_card.CURVE))


def test_the_parent_of_dpo_and_classifier_checkpoints_from_what_they_recorded():
    assert model_card.parent_model({'config': {'init_from': 'scratch'}}, {}) is None
    assert model_card.parent_model({'config': {'init_from': 'resume'}}, {'init_from': 'out/chat'}) == 'out/chat'
    dpo = {'config': {'init_from': 'resume'}, 'dpo': {'init_from': 'out/sft'}}  # a run resumed before the log said it
    assert model_card.parent_model(dpo, {}) == 'out/sft'
    classifier = {'config': {'init_from': 'out/biblia-pt'}, 'head': {}}  # classifier.pt holds its last settings
    assert model_card.parent_model(classifier, {}) == 'out/biblia-pt'
