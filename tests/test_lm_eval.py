"""lm-evaluation-harness agrees with eval.py on an export, with no extra flags: `lm_eval --model hf
--model_args pretrained=EXPORT` on a local multiple-choice task gives eval.py's per-choice
log-likelihoods (to 1e-4) and its accuracy, for a Llama export and a Gemma (tied GeGLU) one.
Offline: the task is a YAML file and a JSONL file written here (nothing is downloaded)."""
import json
import os
import sys
from dataclasses import asdict

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import eval as mirim_eval  # noqa: E402
import export  # noqa: E402
from conftest import tiny_sentencepieces, word_rotations  # noqa: E402
from test_export import sharp_model  # noqa: E402
from mirim.checkpoint import load_model  # noqa: E402
from model import LlamaConfig  # noqa: E402

lm_eval = pytest.importorskip('lm_eval', reason="lm-evaluation-harness is not installed (pip install lm-eval, "
                                                "requirements-dev.txt): these tests compare eval.py with it")
pytest.importorskip('transformers')

pytestmark = pytest.mark.usefixtures('one_thread')

# a made-up book in the Bible demo's shape: chapters of verses, the verse task's choices start with '\n'
CHAPTERS = [
    ["No princípio era a palavra, e a palavra estava com Deus.", "E disse Deus: haja luz; e houve luz.",
     "E viu Deus que a luz era boa; e separou a luz das trevas.", "E chamou à luz dia, e às trevas noite.",
     "E foi a tarde e a manhã, o dia primeiro."],
    ["Então o Senhor falou a Moisés, dizendo:", "Fala aos filhos de Israel que me tragam uma oferta.",
     "E esta é a oferta que tomareis deles: ouro, e prata, e cobre.", "E farão uma arca de madeira de acácia.",
     "E a cobrirás de ouro puro, por dentro e por fora."],
]
# and examples of the JSONL form eval.py documents: a choice that runs on with a space, a context
# that ends in spaces (both tools move them to the choice), a multi-line context
MORE = [
    {'context': 'E disse Deus:', 'choices': [' Haja luz', ' Haja trevas', ' Ouro e prata'], 'gold': 0},
    {'context': 'E chamou à luz  ', 'choices': ['dia', 'noite', 'arca'], 'gold': 0},
    {'context': 'Fala aos filhos\nde Israel', 'choices': [' que me tragam uma oferta.', ' acácia.'], 'gold': 0},
]
VOCAB = 340


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
    texts = [' '.join(chapter) for chapter in CHAPTERS] + ['\n'.join(chapter) for chapter in CHAPTERS]
    return tiny_sentencepieces(word_rotations(texts, rounds=30), tmp_path_factory, VOCAB)['bpe']


@pytest.fixture(scope='module')
def task(tmp_path_factory):
    """(the folder of a local lm-eval task, its examples as eval.py reads them)."""
    examples = mirim_eval.verse_examples({'Livro': CHAPTERS}, count=0, choices=3)
    examples = [{k: e[k] for k in ('context', 'choices', 'gold')} for e in examples] + MORE
    folder = tmp_path_factory.mktemp('task')
    data = folder / 'mirim_choices.jsonl'
    data.write_text(''.join(json.dumps(e, ensure_ascii=False) + '\n' for e in examples), encoding='utf-8')
    # eval.py appends a choice to the context as it is: no target_delimiter (lm-eval's default is ' ')
    (folder / 'mirim_choices.yaml').write_text(f"""task: mirim_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ''
metric_list:
  - metric: acc
  - metric: acc_norm
""", encoding='utf-8')
    return str(folder), mirim_eval.read_multiple_choice(str(data))


def trained_like(config, seed):
    """A random model with a spread of log-likelihoods (a bigger embedding than at init), so that
    accuracy compares the two tools and not ties; about 7 nats a token, near a trained model's few
    (much larger sums would compare float32 rounding, not the two tools)."""
    return sharp_model(config, seed, scale=5.0)


@pytest.mark.parametrize('activation,tied,architecture', [('silu', False, 'LlamaForCausalLM'),
                                                          ('gelu_tanh', True, 'GemmaForCausalLM')])
def test_lm_eval_gives_eval_py_log_likelihoods_and_accuracy(tok, task, tmp_path, monkeypatch, activation, tied,
                                                             architecture):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    for name in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'TRANSFORMERS_OFFLINE'):
        monkeypatch.setenv(name, '1')
    monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'datasets'))  # nothing shared between runs
    config = LlamaConfig(vocab_size=VOCAB, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                         ffn_hidden=96, activation=activation, tie_embeddings=tied, bos_id=tok.bos_id,
                         eos_id=tok.eos_id, pad_id=tok.pad_id)
    model = trained_like(config, seed=7)
    os.makedirs(tmp_path / 'out')
    torch.save({'model': model.state_dict(), 'model_config': asdict(config), 'tokenizer': tok.to_dict()},
               tmp_path / 'out' / 'ckpt.pt')
    dest = export.export(str(tmp_path / 'out'), str(tmp_path / 'hf'))
    with open(os.path.join(dest, 'config.json')) as f:
        assert json.load(f)['architectures'] == [architecture]

    folder, examples = task
    mirim_model, mirim_tok, _ = load_model(str(tmp_path / 'out'))
    metrics, ours = mirim_eval.evaluate_multiple_choice(mirim_model, mirim_tok, examples)

    # `lm_eval --model hf --model_args pretrained=DEST --tasks mirim_choices --include_path FOLDER`
    results = simple_evaluate(model='hf', model_args=f'pretrained={dest}', tasks=['mirim_choices'],
                              task_manager=TaskManager(include_path=folder), device='cpu', batch_size=4,
                              log_samples=True)
    agrees_with_eval_py(results, examples, ours, metrics, architecture)
    assert 0 < metrics['acc'] < 1 or metrics['acc_norm'] != metrics['acc']  # the scores are not all alike


def agrees_with_eval_py(results, examples, ours, metrics, what):
    """lm-eval's per-choice log-likelihoods equal eval.py's (ours) to 1e-4, and its acc / acc_norm eval.py's."""
    samples = sorted(results['samples']['mirim_choices'], key=lambda s: s['doc_id'])
    theirs = [[float(resp[0][0]) for resp in sample['resps']] for sample in samples]
    assert [len(lls) for lls in theirs] == [len(e['choices']) for e in examples]
    worst = max(abs(a - b) for mine, other in zip(ours, theirs) for a, b in zip(mine, other))
    print(f'{what}: {sum(map(len, ours))} choices, max |log-likelihood difference| {worst:.2e}')
    assert worst < 1e-4
    got = results['results']['mirim_choices']
    assert (got['acc,none'], got['acc_norm,none']) == pytest.approx((metrics['acc'], metrics['acc_norm']), abs=1e-9)
