"""
Plan a training run before paying for it: parameters, FLOPs, how many tokens to train on, what
model size a corpus supports, and the time and money the run will take.

    python plan.py --model=ttl-160m                          # a preset
    python plan.py config/train_biblia_pt.py                 # a training config: its model, tokens, corpus
    python plan.py --params=160e6                            # just a parameter count (FLOPs ~ 6 x params)
    python plan.py --model=demo --data_dir=data/biblia/pt    # the model size the corpus supports
    python plan.py --model=ttl-160m --n_layer=16             # any of train.py's keys, as train.py reads them
    python plan.py --model=ttl-160m --gpu=H100 --mfu=0.4 --gpu_hour_price=2.5
    python plan.py config/x.py --log=out/x/log.jsonl         # time from the tokens/s a run measured
    python plan.py --model=demo --tokens_per_sec=9000        # or from bench.py's number
    python plan.py config/tinyllama_1b.py --gpu=A100 --gpu_memory=40   # does it need FSDP? (the memory plan)

Tokens to train on, per parameter (total parameters, embeddings included):
  - Chinchilla: ~20 tokens per parameter is compute-optimal (Hoffmann et al. 2022, "Training
    Compute-Optimal Large Language Models", arXiv:2203.15556): for a fixed compute budget, the
    loss is lowest when parameters and tokens grow together, about 20 tokens each.
  - What the seed models did: TeenyTinyLlama-160m trained 457,969 steps of 4 x 2048 tokens (model
    card; Corrêa et al. 2024, arXiv:2401.16640) = 3.75B tokens, ~23 tokens/param, and -460m 1.2M
    such steps = 9.8B tokens, ~21/param: both sized by the Chinchilla rule. (Their corpus, Pt-Corpus
    Instruct, holds 6.2B tokens: 38 per parameter of the 160m, which saw 0.6 epochs of it.)
    cucafera (244M) trained 11,007 steps of 524,288 tokens (model card): 5.77B tokens, ~24/param.
    TinyLlama trained 1.1B parameters on 3T tokens (Zhang et al. 2024, arXiv:2401.02385), ~2,700
    tokens/param: a small model keeps improving long past "optimal" and is cheaper to run, so when
    inference cost matters one trains far beyond 20x.
Training FLOPs per token come from model.py (6 per weight for forward + backward, plus attention;
PaLM appendix B). Time from peak FLOP/s: FLOPs / (peak x MFU x GPUs); peak bf16 dense FLOP/s from
NVIDIA's datasheets (A100 312 TFLOPS; H100 SXM and H200 989 TFLOPS; H100 PCIe 756 TFLOPS: the
datasheets' "with sparsity" figures halved). An MFU of 0.3-0.5 is typical of a well-tuned run.

Memory per GPU (memory_plan, estimates): float32 weights, gradients and optimizer state (AdamW: 2 numbers a
weight; Muon: 1 for the blocks' matrices) = 16 bytes a parameter with AdamW, all of it on every GPU with DDP
and 1/N of it with FSDP over N GPUs (plus two blocks gathered in bf16 at a time); and activations, what
the backward pass keeps of each block per token in bf16, counted from model.py's forward (norm inputs and
outputs, the q/k/v/attention output, the MLP's gate, up and product: ~26 x width + 10 x kv width + 12 x
MLP width bytes per layer; attention by SDPA, so nothing of length^2), times batch_size x block_size
tokens; with activation checkpointing each block keeps only its float32 input. 90% of the GPU's memory
counts as usable (the CUDA context, the allocator's fragmentation).
"""
import difflib
import statistics
import sys

from mirim import train_config as train_settings
from mirim.run import check_run_config
from mirim.sizing import CHINCHILLA_TOKENS_PER_PARAM, human, size_run
from mirim.out_dir import read_log
from mirim.train_config import check_config, depth_dial

# plan.py's own options; every other --key=value (and any config file) is train.py's, resolved as
# train.py resolves it: --model=PRESET, --n_layer=..., --max_iters=..., --batch_size=..., --data_dir=...
DEFAULTS = dict(
    params=0.0,            # instead of a model: just a parameter count, e.g. 160e6 (FLOPs ~ 6 x params)
    tokens=0.0,            # tokens the run will train on; 0 = the config's max_iters x tokens per step
    tokens_per_sec=0.0,    # measured training throughput of the whole run (all GPUs), e.g. from bench.py
    log='',                # or a train.py log.jsonl (or its out_dir) to read the measured tokens/s from
    gpu='',                # A100 | H100 | H100-PCIe | H200: time estimated from peak FLOP/s and --mfu
    mfu=0.4,               # model FLOPs utilisation assumed with --gpu
    num_gpus=1,
    gpu_hour_price=0.0,    # price of one GPU for one hour (any currency), for the cost
    context=0,             # sequence length for attention FLOPs; 0 = the model's block_size
    gpu_memory=0.0,        # GB of one GPU, for the memory plan; 0 = --gpu's (A100 80, H100 80, H200 141), else 80
)
PLAN_KEYS = set(DEFAULTS)

# memory of one GPU, GB (NVIDIA's datasheets; the A100 also comes with 40)
GPU_MEMORY_GB = {'H100 PCIe': 80, 'H100': 80, 'H200': 141, 'A100': 80}
USABLE = 0.9  # of a GPU's memory: the rest goes to the CUDA context and the allocator's fragmentation


# (name, tokens, parameters) of published runs, for their tokens per parameter
PUBLISHED_RUNS = [
    ('TeenyTinyLlama-160m', 457_969 * 4 * 2048, 162_417_408),  # model card: 457,969 steps, batch 4, context 2048
    ('TeenyTinyLlama-460m', 1_200_000 * 4 * 2048, 468_239_360),  # model card: 1.2M steps, same batch
    ('cucafera-244m', 11_007 * 524_288, 244e6),                # model card: 11,007 steps x 524,288 tokens
    ('TinyLlama-1.1B', 3e12, 1.1e9),                           # arXiv:2401.02385: 3T tokens (1T x ~3 epochs)
]
TTL_CORPUS_TOKENS = 6.2e9  # Pt-Corpus Instruct, the TeenyTinyLlama models' pre-training data (model cards)


def duration(seconds):
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# -----------------------------------------------------------------------------
# the model

def count_params(shape, context=None):
    """Parameters and training FLOPs per token of a model.py Llama of this shape (LlamaConfig fields),
    counted from the shape alone, so it is instant even for a big model. Same counts as model.py's
    num_params() and flops_per_token() (tests/test_plan.py checks that they agree)."""
    from model import LlamaConfig
    c = LlamaConfig(**shape)
    attention = c.n_embd * (c.n_head + 2 * c.n_kv_head) * c.head_size + c.n_head * c.head_size * c.n_embd
    layer = attention + 3 * c.n_embd * c.ffn_hidden + 2 * c.n_embd   # wqkv + wo, w13 + w2, two norms
    embedding = c.vocab_size * c.n_embd
    non_embedding = c.n_layer * layer + c.n_embd + (0 if c.tie_embeddings else embedding)  # + final norm, head
    matmul = non_embedding - (2 * c.n_layer + 1) * c.n_embd + (embedding if c.tie_embeddings else 0)
    context = context or c.block_size
    flops = 6 * matmul + 12 * c.n_layer * c.n_head * c.head_size * context  # as Llama.flops_per_token
    return {'params': embedding + non_embedding, 'non_embedding': non_embedding, 'flops_per_token': flops,
            'context': context}


def model_facts(shape=None, params=None, context=None):
    """{'params', 'non_embedding', 'flops_per_token', 'context'} of a model shape (a dict of LlamaConfig
    fields), or of a bare parameter count (FLOPs ~ 6 x params, attention not counted)."""
    if shape is None:
        return {'params': int(params), 'non_embedding': None, 'flops_per_token': 6 * int(params), 'context': None}
    return count_params(shape, context)


def params_supported(corpus_tokens, tokens_per_param=CHINCHILLA_TOKENS_PER_PARAM):
    """The model size that a corpus of corpus_tokens trains compute-optimally in one epoch."""
    return corpus_tokens / tokens_per_param


def token_rules(params):
    """(name, tokens per parameter, tokens for this model) of the Chinchilla rule and the published runs."""
    rules = [('Chinchilla, 20 tokens/param', CHINCHILLA_TOKENS_PER_PARAM)]
    rules += [(f"as {name}", tokens / n) for name, tokens, n in PUBLISHED_RUNS]
    return [(name, ratio, ratio * params) for name, ratio in rules]


def depth_table(vocab_size, corpus_tokens=None, tokens_per_param=CHINCHILLA_TOKENS_PER_PARAM, max_epochs=4.0,
                depths=range(2, 25)):
    """One row per depth: the shape model='auto' builds and the run the dial sizes for it."""
    from model import depth_shape
    rows = []
    for depth in depths:
        shape = {**depth_shape(depth), 'vocab_size': vocab_size}
        facts = count_params(shape)
        run = size_run(facts['params'], shape['block_size'], tokens_per_param, corpus_tokens, max_epochs)
        rows.append({'depth': depth, **shape, **facts, **run})
    return rows


def depth_table_text(rows):
    lines = [f"{'depth':>5} {'width':>5} {'heads':>5} {'kv':>3} {'mlp':>5} {'context':>7} {'params':>7} "
             f"{'tokens':>7} {'tok/step':>8} {'steps':>7} {'FLOPs':>8}  tokens from"]
    for r in rows:
        lines.append(f"{r['depth']:>5} {r['n_embd']:>5} {r['n_head']:>5} {r['n_kv_head']:>3} {r['ffn_hidden']:>5} "
                     f"{r['block_size']:>7} {human(r['params']):>7} {human(r['tokens']):>7} {r['batch_tokens']:>8,} "
                     f"{r['max_iters']:>7,} {r['tokens'] * r['flops_per_token']:>8.1e}  {r['why']}")
    return '\n'.join(lines)


def memory_plan(shape, batch_size, optimizer='adamw', gpu_gb=80.0, num_gpus=1):
    """Bytes one GPU holds to train a model of this shape (estimates; see the docstring) and the parallel
    setting it needs -> dict: states (weights + gradients + optimizer, fp32), activations (and with activation
    checkpointing), ddp (a whole model per GPU), and 'advice': (parallel, processes, activation_checkpointing) or
    None when not even FSDP over 8 GPUs (or num_gpus) with checkpointing fits."""
    from model import LlamaConfig
    c = LlamaConfig(**shape)
    params = count_params(shape)['params']
    embedding = c.vocab_size * c.n_embd * (1 if c.tie_embeddings else 2)
    states = 8 * params + (8 * params if optimizer == 'adamw' else 4 * params + 4 * embedding)
    kv = c.n_kv_head * c.head_size
    per_token_layer = 26 * c.n_embd + 10 * kv + 12 * c.ffn_hidden
    tokens = batch_size * c.block_size
    logits = 2 * 4 * min(tokens, max(1, 2 ** 24 // c.vocab_size)) * c.vocab_size  # a chunk of fp32 logits, twice
    activations = tokens * c.n_layer * per_token_layer + logits
    checkpointed = tokens * (c.n_layer * 4 * c.n_embd + per_token_layer) + logits
    block = 2 * 2 * (params - embedding) // c.n_layer  # two blocks' weights gathered in bf16
    usable = USABLE * gpu_gb * 1e9
    result = {'params': params, 'states': states, 'activations': activations, 'checkpointed': checkpointed,
              'ddp': states + activations, 'gpu_gb': gpu_gb, 'batch_size': batch_size, 'block_size': c.block_size,
              'fsdp': {}}
    for n in ([num_gpus] if num_gpus > 1 else [2, 4, 8]):
        result['fsdp'][n] = (states // n + block + activations, states // n + block + checkpointed)
    if result['ddp'] <= usable:
        result['advice'] = ('ddp', num_gpus, False)
        return result
    result['advice'] = None
    for checkpointing in (False, True):
        for n, totals in result['fsdp'].items():
            if totals[checkpointing] <= usable:
                result['advice'] = ('fsdp', n, checkpointing)
                return result
    return result


def memory_text(memory, command, accumulation):
    gb = lambda b: f"{b / 1e9:.1f} GB" if b >= 1e9 else f"{b / 1e6:.1f} MB"  # noqa: E731
    lines = [f"memory per GPU (estimates: batch_size {memory['batch_size']} x {memory['block_size']} tokens, bf16 "
             f"activations; a {memory['gpu_gb']:g} GB GPU, {USABLE:.0%} of it usable):",
             f"  weights + gradients + optimizer state (fp32): {gb(memory['states'])}; activations "
             f"{gb(memory['activations'])} ({gb(memory['checkpointed'])} with activation_checkpointing)",
             f"  DDP (the whole model on each GPU): {gb(memory['ddp'])}"]
    fits_ddp = memory['advice'] is not None and memory['advice'][0] == 'ddp'
    for n, (plain, checkpointed) in memory['fsdp'].items() if not fits_ddp else ():
        lines.append(f"  FSDP2 over {n} GPUs: {gb(plain)} ({gb(checkpointed)} with activation_checkpointing)")
    advice = memory['advice']
    if advice is None:
        lines.append("  -> does not fit even with FSDP2 and activation checkpointing: lower batch_size (and raise "
                     "gradient_accumulation_steps), or use more GPUs (--num_gpus)")
    elif advice[0] == 'ddp':
        lines.append("  -> fits one GPU: parallel='ddp' (the default)" + (
            f": torchrun --standalone --nproc_per_node={advice[1]} train.py {command}" if advice[1] > 1 else ""))
    else:
        _, n, checkpointing = advice
        lines.append(f"  -> needs FSDP: torchrun --standalone --nproc_per_node={n} train.py {command} --parallel=fsdp"
                     + (" --activation_checkpointing=True" if checkpointing else ""))
        if accumulation % n:
            lines.append(f"     (gradient_accumulation_steps={accumulation} counts micro-batches over all processes: "
                         f"make it a multiple of {n})")
    return '\n'.join(lines)


# -----------------------------------------------------------------------------
# config files and logs

def resolve(argv):
    """plan.py's options and train.py's resolved config, for these config files and --key=value (train.py's keys
    resolved as train.py resolves them) -> (options, train_config)."""
    from mirim.configurator import configure, describe
    if '--help' in argv or '-h' in argv:  # plan.py's own options, then train.py's keys
        usage = (f"usage: python plan.py [config.py ...] [--key=value ...]\n\nplan.py's options:\n"
                 f"{describe(DEFAULTS, __file__)}\n\nand train.py's, read as train.py reads them:")
        configure(train_settings.DEFAULTS, ['--help'], help_source=train_settings.__file__, usage=usage)
    config = configure({**train_settings.DEFAULTS, **DEFAULTS}, argv)
    return {key: config[key] for key in DEFAULTS}, {key: config[key] for key in train_settings.DEFAULTS}


def model_shape(train_config, meta=None):
    """The LlamaConfig fields train.py would build from this config: its preset, the shape keys it
    sets, and the vocab of the data (meta) when given, else the preset's."""
    from dataclasses import asdict
    from model import PRESETS
    from mirim.init_from import requested_model_config
    if meta is None:
        meta = {'vocab_size': PRESETS.get(train_config['model'], {}).get('vocab_size', 0) or None}
    return asdict(requested_model_config(train_config, meta))


def tokens_from_config(train_config, block_size):
    """Tokens a training run sees: max_iters x batch_size x block_size x gradient_accumulation_steps
    (train.py's accumulation steps count all processes, so this holds for any number of GPUs)."""
    return float(train_config['max_iters'] * train_config['batch_size'] * block_size
                 * train_config['gradient_accumulation_steps'])


def tokens_per_sec_from_log(path):
    """Median training tokens/s over a log.jsonl's lines, the first (warm-up, compilation) left out.
    Reads a tokens/s field if there is one, else divides tokens by time between lines."""
    records = read_log(path)
    for key in ('tokens_per_sec', 'tokens_per_second', 'tok_per_sec', 'tokens/s'):
        rates = [r[key] for r in records if isinstance(r.get(key), (int, float)) and r[key] > 0]
        if rates:
            return statistics.median(rates[1:] or rates)
    for time_key in ('time', 'elapsed', 'wall_time'):
        points = [(r['tokens'], r[time_key]) for r in records if 'tokens' in r and time_key in r]
        rates = [(t2 - t1) / (s2 - s1) for (t1, s1), (t2, s2) in zip(points, points[1:]) if s2 > s1 and t2 > t1]
        if rates:
            return statistics.median(rates[1:] or rates)
    raise ValueError(f"{path}: no tokens/s in the log (looked for tokens_per_sec, or tokens with time)")


# -----------------------------------------------------------------------------

def plan(config):
    """Everything plan.py prints, as a dict (the command line formats it)."""
    facts = model_facts(config.get('shape'), config.get('params') or None, config.get('context') or None)
    params = facts['params']
    result = {'model': config.get('name'), **facts}
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
        from mirim.common import PEAK_FLOPS
        gpu = config['gpu'].replace('-', ' ')  # --gpu=H100-PCIe: no quotes needed on the command line
        if gpu not in PEAK_FLOPS:
            close = difflib.get_close_matches(gpu, PEAK_FLOPS, n=1)
            raise ValueError(f"unknown --gpu={gpu}" + (f"; did you mean {close[0]}?" if close else '')
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


def check_options(options, train_config):
    from types import SimpleNamespace
    checks = [(min(options['params'], options['tokens'], options['tokens_per_sec'], options['gpu_hour_price'],
                   options['context'], options['gpu_memory']) >= 0, "params, tokens, tokens_per_sec, gpu_hour_price, context and gpu_memory must not be "
                                             "negative (0 = not given)"),
              (0 < options['mfu'] <= 1, "mfu must be in (0, 1]: a share of the GPU's peak"),
              (options['num_gpus'] >= 1, "num_gpus must be at least 1")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    settings = SimpleNamespace(**train_config)  # the run's own settings, as train.py checks them
    check_run_config(settings)
    check_config(settings)


def main(argv=None):
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (OSError, ValueError) as e:  # ShardError and ConfigError are ValueErrors
        raise SystemExit(f"plan.py: error: {e}") from None


def run(argv):
    options, train_config = resolve(argv)
    check_options(options, train_config)
    has_file = any(arg.endswith('.py') and not arg.startswith('-') for arg in argv)  # a config file (not a value)
    given = {arg[2:].partition('=')[0] for arg in argv if arg.startswith('--')} & set(train_config)
    # the corpus counts when the run names one (a config file, --data_dir) and it has been prepared
    meta = None
    if has_file or 'data_dir' in given:
        from mirim.shards import load_meta
        try:
            meta = load_meta(train_config['data_dir'])
        except FileNotFoundError:
            if 'data_dir' in given:
                raise
            print(f"(corpus {train_config['data_dir']} not prepared yet: planning with the preset's vocab)")
    config = dict(options)
    if options['params'] and not (has_file or given):
        config['shape'], config['name'] = None, None
    else:
        config['shape'], config['name'] = model_shape(train_config, meta), train_config['model']
    if train_config['model'] == 'auto':  # max_iters and batch_size as train.py's depth dial sets them
        block_size = config['shape']['block_size']
        for line in depth_dial(train_config, count_params(config['shape'])['params'], block_size,
                                meta['splits']['train']['tokens'] if meta else None):
            print(line)
        given |= {'max_iters'}
    if not config['tokens'] and config['shape'] and (has_file or given & {'max_iters', 'batch_size',
                                                                         'gradient_accumulation_steps'}):
        config['tokens'] = tokens_from_config(train_config, config['shape']['block_size'])
        config['tokens_source'] = 'this config (max_iters)'
    if meta is not None:
        config['corpus_tokens'] = meta['splits']['train']['tokens']
    if options['log']:
        config['tokens_per_sec'] = tokens_per_sec_from_log(options['log'])
    result = plan(config)
    print(report(result))
    if config['shape']:
        gpu = options['gpu'].replace('-', ' ')
        gpu_gb = options['gpu_memory'] or GPU_MEMORY_GB.get(gpu, 80.0)
        result['memory'] = memory_plan(config['shape'], train_config['batch_size'], train_config['optimizer'], gpu_gb,
                                       options['num_gpus'])
        command = ' '.join(arg for arg in argv if not (arg.startswith('--') and arg[2:].partition('=')[0] in PLAN_KEYS))
        print()
        print(memory_text(result['memory'], command or '...', train_config['gradient_accumulation_steps']))
    if train_config['model'] == 'auto':  # the depth dial: the same derivation for every depth
        result['depth_table'] = depth_table(config['shape']['vocab_size'], config.get('corpus_tokens'),
                                            train_config['tokens_per_param'], train_config['max_epochs'])
        print(f"\nmodel='auto': what each depth builds and the run it sizes (vocab {config['shape']['vocab_size']}"
              + (f", a corpus of {human(config['corpus_tokens'])} train tokens" if config.get('corpus_tokens') else "")
              + f"; this config: depth {train_config['depth']})")
        print(depth_table_text(result['depth_table']))
    return result


if __name__ == '__main__':
    main()
