"""
Plan a training run before paying for it: parameters, FLOPs, how many tokens to train on, what
model size a corpus supports, and the time and money the run will take.

    python plan.py --model=ttl-160m                          # a preset
    python plan.py config/train_biblia_pt.py                 # a training config (its shape and token budget)
    python plan.py --params=160e6                            # just a parameter count (FLOPs ~ 6 x params)
    python plan.py --model=demo --data_dir=data/biblia/pt    # the model size the corpus supports
    python plan.py --model=ttl-160m --gpu=H100 --mfu=0.4 --gpu_hour_price=2.5
    python plan.py config/x.py --log=out/x/log.jsonl         # time from the tokens/s a run measured
    python plan.py --model=demo --tokens_per_sec=9000        # or from bench.py's number

Tokens to train on, per parameter (total parameters, embeddings included):
  - Chinchilla: ~20 tokens per parameter is compute-optimal (Hoffmann et al. 2022, "Training
    Compute-Optimal Large Language Models", arXiv:2203.15556): for a fixed compute budget, the
    loss is lowest when parameters and tokens grow together, about 20 tokens each.
  - What the seed models did: TeenyTinyLlama-160m saw its 6.2B-token corpus (Pt-Corpus Instruct,
    model card; Corrêa et al. 2024, arXiv:2401.16640): ~38 tokens/param. cucafera (244M) trained
    11,007 steps of 524,288 tokens (model card): 5.77B tokens, ~24 tokens/param. TinyLlama trained
    1.1B parameters on 3T tokens (Zhang et al. 2024, arXiv:2401.02385), ~2,700 tokens/param: a
    small model keeps improving long past "optimal" and is cheaper to run, so when inference cost
    matters one trains far beyond 20x.
Training FLOPs per token come from model.py (6 per weight for forward + backward, plus attention;
PaLM appendix B). Time from peak FLOP/s: FLOPs / (peak x MFU x GPUs); peak bf16 dense FLOP/s from
NVIDIA's datasheets (A100 312 TFLOPS; H100 SXM and H200 989 TFLOPS; H100 PCIe 756 TFLOPS: the
datasheets' "with sparsity" figures halved). An MFU of 0.3-0.5 is typical of a well-tuned run.
"""
import ast
import difflib
import json
import math
import os
import statistics
import sys

# defaults; override with --key=value
DEFAULTS = dict(
    model='',              # a preset name from model.py (ttl-160m, demo, ...)
    params=0.0,            # or just a parameter count, e.g. 160e6 (no shape: FLOPs ~ 6 x params)
    tokens=0.0,            # tokens the run will train on; 0 = from the config file, else the Chinchilla count
    data_dir='',           # a prepared corpus: its train tokens say what model size it supports
    tokens_per_sec=0.0,    # measured training throughput of the whole run (all GPUs), e.g. from bench.py
    log='',                # or a train.py log.jsonl (or its out_dir) to read the measured tokens/s from
    gpu='',                # A100 | H100 | H100-PCIe | H200: time estimated from peak FLOP/s and --mfu
    mfu=0.4,               # model FLOPs utilisation assumed with --gpu
    num_gpus=1,
    gpu_hour_price=0.0,    # price of one GPU for one hour (any currency), for the cost
    context=0,             # sequence length for attention FLOPs; 0 = the model's block_size
)

# bf16 dense tensor-core peak FLOP/s (NVIDIA datasheets; their sparse figures are 2x these)
PEAK_FLOPS = {'A100': 312e12, 'H100': 989e12, 'H100-PCIe': 756e12, 'H200': 989e12}

CHINCHILLA_TOKENS_PER_PARAM = 20
# (name, tokens, parameters) of published runs, for their tokens per parameter
PUBLISHED_RUNS = [
    ('TeenyTinyLlama-160m', 6.2e9, 162_417_408),   # model card: Pt-Corpus Instruct, 6.2B tokens
    ('cucafera-244m', 11_007 * 524_288, 244e6),    # model card: 11,007 steps x 524,288-token batches
    ('TinyLlama-1.1B', 3e12, 1.1e9),               # arXiv:2401.02385: 3T tokens (1T x ~3 epochs)
]


def human(x, unit=''):
    """1234567 -> '1.23M'"""
    for value, suffix in ((1e12, 'T'), (1e9, 'B'), (1e6, 'M'), (1e3, 'k')):
        if abs(x) >= value:
            return f"{x / value:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def duration(seconds):
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# -----------------------------------------------------------------------------
# the model

def model_facts(shape=None, params=None, context=None):
    """{'params', 'non_embedding', 'flops_per_token', ...} of a model shape (a dict of LlamaConfig
    fields), or of a bare parameter count (FLOPs ~ 6 x params, attention not counted)."""
    if shape is None:
        return {'params': int(params), 'non_embedding': None, 'flops_per_token': 6 * int(params),
                'context': None, 'shape': None}
    import torch
    from model import Llama, LlamaConfig
    config = LlamaConfig(**shape)
    with torch.device('meta'):  # shapes only: no memory, no time spent on initialisation
        model = Llama(config)
    context = context or config.block_size
    return {'params': model.num_params(non_embedding=False), 'non_embedding': model.num_params(non_embedding=True),
            'flops_per_token': model.flops_per_token(context), 'context': context, 'shape': shape}


def chinchilla_tokens(params):
    return CHINCHILLA_TOKENS_PER_PARAM * params


def params_supported(corpus_tokens, tokens_per_param=CHINCHILLA_TOKENS_PER_PARAM):
    """The model size that a corpus of corpus_tokens trains compute-optimally in one epoch."""
    return corpus_tokens / tokens_per_param


def token_rules(params):
    """(name, tokens per parameter, tokens for this model) of the Chinchilla rule and the published runs."""
    rules = [('Chinchilla, 20 tokens/param', CHINCHILLA_TOKENS_PER_PARAM)]
    rules += [(f"as {name}", tokens / n) for name, tokens, n in PUBLISHED_RUNS]
    return [(name, ratio, ratio * params) for name, ratio in rules]


# -----------------------------------------------------------------------------
# config files and logs

def read_config_file(path):
    """The module-level names a Python config file sets (as train.py reads it)."""
    if not os.path.isfile(path):
        raise SystemExit(f"config file {path} not found")
    names = {}
    with open(path, encoding='utf-8') as f:
        exec(compile(f.read(), path, 'exec'), {}, names)
    return {k: v for k, v in names.items() if not k.startswith('_') and isinstance(v, (int, float, str, bool, type(None)))}


def shape_from_config(config):
    """A model shape from a training config: its preset (model=/preset=) then any LlamaConfig fields it sets."""
    from model import PRESETS, LlamaConfig
    from dataclasses import fields
    preset = next((config[k] for k in ('model', 'preset', 'model_preset') if isinstance(config.get(k), str)
                   and config[k]), '')
    if preset and preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
    shape = dict(PRESETS.get(preset, {}))
    shape.update({f.name: config[f.name] for f in fields(LlamaConfig) if f.name in config})
    return shape, preset


def tokens_from_config(config):
    """Tokens a training config will see: max_tokens if it says so, else max_iters x tokens per step
    (batch_size x block_size x gradient_accumulation_steps), or None."""
    if config.get('max_tokens'):
        return float(config['max_tokens'])
    if config.get('max_iters') and config.get('batch_size') and config.get('block_size'):
        return float(config['max_iters'] * config['batch_size'] * config['block_size']
                     * (config.get('gradient_accumulation_steps') or 1))
    return None


def tokens_per_sec_from_log(path):
    """Median training tokens/s over a log.jsonl's lines, the first (warm-up, compilation) left out.
    Reads a tokens/s field if there is one, else divides tokens by time between lines."""
    if os.path.isdir(path):
        path = os.path.join(path, 'log.jsonl')
    records = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    for key in ('tokens_per_sec', 'tokens_per_second', 'tok_per_sec', 'tokens/s'):
        rates = [r[key] for r in records if isinstance(r.get(key), (int, float)) and r[key] > 0]
        if rates:
            return statistics.median(rates[1:] or rates)
    for time_key in ('time', 'elapsed', 'wall_time'):
        points = [(r['tokens'], r[time_key]) for r in records if 'tokens' in r and time_key in r]
        rates = [(t2 - t1) / (s2 - s1) for (t1, s1), (t2, s2) in zip(points, points[1:]) if s2 > s1 and t2 > t1]
        if rates:
            return statistics.median(rates[1:] or rates)
    raise SystemExit(f"{path}: no tokens/s in the log (looked for tokens_per_sec, or tokens with time)")


# -----------------------------------------------------------------------------

def plan(config):
    """Everything plan.py prints, as a dict (the command line formats it)."""
    facts = model_facts(config.get('shape'), config.get('params') or None, config.get('context') or None)
    params = facts['params']
    result = {'model': config.get('name'), **{k: v for k, v in facts.items() if k != 'shape'}}
    rows = token_rules(params)
    if config.get('tokens'):
        rows.append((config.get('tokens_source') or 'planned', config['tokens'] / params, config['tokens']))
    result['token_rules'] = [{'rule': name, 'tokens_per_param': ratio, 'tokens': tokens} for name, ratio, tokens in rows]

    if config.get('corpus_tokens'):
        corpus = config['corpus_tokens']
        result['corpus'] = {'train_tokens': corpus, 'params_supported_at_20x': params_supported(corpus),
                            'epochs': {r['rule']: r['tokens'] / corpus for r in result['token_rules']}}

    throughput = {}
    if config.get('tokens_per_sec'):
        throughput['measured'] = config['tokens_per_sec']
    if config.get('gpu'):
        gpu = config['gpu']
        if gpu not in PEAK_FLOPS:
            close = difflib.get_close_matches(gpu, PEAK_FLOPS, n=1)
            raise SystemExit(f"unknown --gpu={gpu}" + (f"; did you mean {close[0]}?" if close else '')
                             + f" (known: {', '.join(PEAK_FLOPS)})")
        peak = PEAK_FLOPS[gpu] * config['mfu'] * config['num_gpus']
        throughput[f"{config['num_gpus']}x {gpu} at MFU {config['mfu']:.0%}"] = peak / facts['flops_per_token']
    result['throughput'] = throughput
    for row in result['token_rules']:
        row['training_flops'] = row['tokens'] * facts['flops_per_token']
        row['hours'] = {name: row['tokens'] / rate / 3600 for name, rate in throughput.items()}
        if config.get('gpu_hour_price'):
            row['cost'] = {name: hours * config['num_gpus'] * config['gpu_hour_price']
                           for name, hours in row['hours'].items()}
    return result


def report(result):
    lines = []
    if result['non_embedding'] is None:
        lines.append(f"model: {result['params']:,} parameters (no shape given: FLOPs/token ~ 6 x params, "
                     f"attention not counted)")
    else:
        lines.append(f"model {result['model'] or ''}: {result['params']:,} parameters "
                     f"({result['non_embedding']:,} without the token embedding), context {result['context']}")
    lines.append(f"training FLOPs per token: {result['flops_per_token']:.3e} "
                 f"({human(result['flops_per_token'])}; forward + backward)")
    lines.append('')
    names = list(result['throughput'])
    priced = any('cost' in row for row in result['token_rules'])
    header = f"{'tokens to train on':<30} {'tok/param':>9} {'tokens':>7} {'FLOPs':>8}"
    for name in names:
        header += f" | time ({name})" + (" |   cost" if priced else "")
    lines.append(header)
    for row in result['token_rules']:
        line = f"{row['rule']:<30} {row['tokens_per_param']:>9.1f} {human(row['tokens']):>7} {row['training_flops']:>8.1e}"
        for name in names:
            line += f" | {duration(row['hours'][name] * 3600):>{len(name) + 7}}"
            if priced:
                line += f" | {row['cost'][name]:>6,.0f}"
        lines.append(line)
    if names:
        lines.append('throughput: ' + '; '.join(f"{name}: {human(rate)} tokens/s" for name, rate in
                                                result['throughput'].items()))
    if 'corpus' in result:
        corpus = result['corpus']
        lines.append('')
        lines.append(f"corpus: {human(corpus['train_tokens'])} train tokens support a model of "
                     f"~{human(corpus['params_supported_at_20x'])} parameters at 20 tokens/param (one epoch)")
        lines.append('epochs over it: ' + ', '.join(f"{rule.split(',')[0]} {epochs:.3g}" for rule, epochs in
                                                    corpus['epochs'].items()))
        lines.append("(repeating data up to ~4 epochs costs little; Muennighoff et al. 2023, arXiv:2305.16264)")
    return '\n'.join(lines)


def parse_args(argv):
    """A config file (optional, first) then --key=value overrides of DEFAULTS or of LlamaConfig fields."""
    from dataclasses import fields
    from model import LlamaConfig
    config, shape_overrides, file_config = dict(DEFAULTS), {}, {}
    shape_fields = {f.name: f.type for f in fields(LlamaConfig)}
    for arg in argv:
        if not arg.startswith('--'):
            file_config = read_config_file(arg)
            continue
        key, _, value = arg[2:].partition('=')
        if key not in config and key not in shape_fields:
            close = difflib.get_close_matches(key, list(config) + list(shape_fields), n=3)
            raise SystemExit(f"unknown option --{key}" + (f"; did you mean {', '.join('--' + c for c in close)}?"
                                                         if close else ''))
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        if key in shape_fields:
            shape_overrides[key] = parsed
            continue
        expected = type(config[key])
        if expected is str:
            parsed = value
        elif expected is float and isinstance(parsed, int) and not isinstance(parsed, bool):
            parsed = float(parsed)
        elif expected is int and isinstance(parsed, float) and parsed.is_integer():
            parsed = int(parsed)
        if type(parsed) is not expected:
            raise SystemExit(f"--{key} must be {expected.__name__}, got {value!r}")
        config[key] = parsed
    return config, shape_overrides, file_config


def main(argv=None):
    from model import PRESETS
    config, shape_overrides, file_config = parse_args(sys.argv[1:] if argv is None else argv)
    shape, name = shape_from_config(file_config) if file_config else ({}, '')
    if config['model']:
        if config['model'] not in PRESETS:
            raise SystemExit(f"unknown --model={config['model']}; presets: {', '.join(sorted(PRESETS))}")
        shape, name = dict(PRESETS[config['model']]), config['model']
    shape.update(shape_overrides)
    if not shape and not config['params']:
        raise SystemExit("give a model: a config file, --model=PRESET, or --params=COUNT (see plan.py's docstring)")
    config['shape'] = shape or None
    config['name'] = name
    if not config['tokens'] and file_config:
        config['tokens'] = tokens_from_config(file_config) or 0.0
        config['tokens_source'] = 'this config'
    data_dir = config['data_dir'] or file_config.get('data_dir', '')
    if data_dir:
        from shards import load_meta
        config['corpus_tokens'] = load_meta(data_dir)['splits']['train']['tokens']
    if config['log']:
        config['tokens_per_sec'] = tokens_per_sec_from_log(config['log'])
    result = plan(config)
    print(report(result))
    return result


if __name__ == '__main__':
    main()
