"""
Measure mirim's speed on this machine, side by side with Hugging Face's LlamaForCausalLM of the
identical shape and weights when transformers is installed.

    python bench.py                              # the default shape, training and generation
    python bench.py --model=demo --batch_size=4  # a preset, other batch
    python bench.py --what=train                 # only the training step (train | generate | loop | all)
    python bench.py --what=loop                  # train.py's own loop on the demo config vs the bare step
    python bench.py --what=prompts               # sample.py on a prompts file: batched vs one at a time
    python bench.py --what=serve                 # serve.py: 1, 8, 32 concurrent clients vs one request at a time
    python bench.py --what=optimizer --model=demo           # a training step with Muon vs AdamW
    python bench.py --what=optimizer --vocab_size=4096 --n_layer=4 --n_embd=128 --n_head=4 --n_kv_head=4 \
        --ffn_hidden=344 --activation=silu --block_size=64 --batch_size=12   # the same at a smaller shape
    python bench.py --what=gguf --out_dir=out/biblia-pt        # mirim fp32 vs llama.cpp on its GGUF files

Loop: train.py run for `loop_iters` steps on config/train_biblia_pt.py (needs data/biblia/pt), its
tokens/s read from log.jsonl (median of the log intervals), against the bare forward + backward +
AdamW step of the same model and batch measured here: the difference is the loop's overhead
(data, clipping, logging).
Prompts: sample.sample_prompts on `num_prompts` prompts of different lengths, greedy, `new_tokens`
each, with batch_size=`prompt_batch` against batch_size=1; new tokens/s of each.
Serve: serve.py on 127.0.0.1 answering `num_prompts` streamed completions (sampled, `new_tokens`
each, no eos) from 1, 8 and 32 concurrent clients, 32 clients asking with 4 different temperatures
(rows with different settings share a step), against a server that takes one request at a time
(max_batch=1) under 32 clients; completion tokens/s and the median time to first token.

Optimizer: the training step (forward, backward, optimizer step) of the same model and batch with
train.py's optimizer='muon' against optimizer='adamw' (optim.make_optimizer), in paired turns; a
Muon step's time over an AdamW step's is the median of the turns' ratios (with their range).
GGUF: mirim fp32 (sample.py's generate path) against llama.cpp (llama-cpp-python) on the GGUF
files gguf_export writes in each of `gguf_types`, for the model in `out_dir` (empty: the shape
below, random weights, the bytes tokenizer), all on the CPU: size on disk (mirim's: its fp32 weights,
export.py's model.safetensors); batch-1 greedy new tokens/s in paired turns, llama.cpp with torch's
number of threads; how many greedy tokens agree with mirim's before the first difference; and the
bits per byte of the val split of `data_dir` (empty: the checkpoint's), scored over eval.py's
windows with llama.cpp's logits at every position and turned into bits per byte as eval.py does.
Training: tokens/s of forward + backward + AdamW step on random tokens (same AdamW settings for both;
mirim computes its loss as train.py does, chunked without full logits, HF as its LlamaForCausalLM does).
With --compile=True mirim is torch.compile'd and eager mirim (same weights) runs in the turns too:
the compile time (the compiled warm-up's extra seconds over the eager one's) against the time each
compiled step saves says after how many steps compiling pays.
Generation: new tokens/s at batch 1 with a KV cache, greedy, a fixed number of tokens (no eos).
Each rate is the median of `repeats` timed runs after a warm-up; mirim and HF take turns, so a
slow spell of the machine hits both alike, and mirim/HF is the median of the turns' ratios.
"""
import copy
import os
import sys
import time
import statistics

import torch

from mirim.generate import generate
from mirim.optim import NS_DTYPES
from model import Llama, LlamaConfig, config_from_preset

# defaults (override with --key=value)
model = ''                 # a preset name; empty = the shape below
vocab_size = 8192
n_embd = 256
n_layer = 4
n_head = 8
n_kv_head = 4
ffn_hidden = 688
activation = 'gelu_tanh'
block_size = 256
batch_size = 8
train_steps = 10           # timed optimizer steps per repeat
prompt_tokens = 16
new_tokens = 128
repeats = 5
what = 'all'               # train | generate | loop | all (train and generate) | prompts | serve | optimizer | gguf
loop_config = 'config/train_biblia_pt.py'
loop_iters = 60
num_prompts = 32
prompt_batch = 16
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'float32'          # float32 | bfloat16 (autocast for training, weights for generation)
compile = False
ns_dtype = 'auto'          # --what=optimizer: Muon's Newton-Schulz dtype: auto (train.py's choice) | float32 | bfloat16
seed = 1337
peak_flops = 0.0           # device peak FLOP/s, to print MFU (e.g. 989e12 for an H100 SXM in bf16)
threads = 0                # torch's CPU threads, and llama.cpp's with --what=gguf; 0 = torch's default
out_dir = ''               # --what=gguf: the model (out_dir, checkpoint or HF folder); '' = the shape above
data_dir = ''              # --what=gguf: data whose val split is scored; '' = the checkpoint's (none: no bpb)
gguf_types = 'f32,f16,q8_0,q4_0'  # --what=gguf: the GGUF files measured

if __name__ == '__main__':
    from mirim.configurator import ConfigError, configure
    try:
        globals().update(configure({k: v for k, v in globals().items()
                                    if not k.startswith('_') and isinstance(v, (int, float, bool, str))}, sys.argv[1:],
                                    help_source=__file__))  # --help reads the comments above
    except ConfigError as e:
        sys.exit(f"bench.py: error: {e}")
    checks = [(what in ('train', 'generate', 'loop', 'prompts', 'serve', 'optimizer', 'gguf', 'all'),
               "what must be train, generate, loop, prompts, serve, optimizer, gguf or all"),
              (set(gguf_types.split(',')) <= {'f32', 'f16', 'q8_0', 'q4_0'}, "gguf_types: one or more of f32, f16, q8_0, q4_0, comma-separated"),
              (threads >= 0, "threads must be at least 0"),
              (dtype in ('float32', 'bfloat16'), "dtype must be float32 or bfloat16"),
              (ns_dtype in NS_DTYPES, "ns_dtype must be auto, float32 or bfloat16"),
              (prompt_tokens + new_tokens <= block_size or what not in ('generate', 'all', 'prompts', 'gguf'),
               "prompt_tokens + new_tokens must fit in block_size"),
              (min(repeats, train_steps, new_tokens, prompt_tokens, batch_size, block_size, loop_iters, num_prompts,
                   prompt_batch) >= 1, "repeats, train_steps, new_tokens, prompt_tokens, batch_size, block_size, "
                                      "loop_iters, num_prompts and prompt_batch must be at least 1")]
    for ok, message in checks:
        if not ok:
            sys.exit(f"bench.py: error: {message}")


def timed_turns(runs, count, repeats, warmups=None):
    """runs: {name: run} where run() does `count` units of work. The runs are warmed up, then timed
    in turns (a, b, a, b, ...) so that a slow spell of the machine hits both alike; returns
    {name: [units per second of each turn]}. warmups: a dict to receive each warm-up's seconds."""
    for name, run in runs.items():
        start = time.perf_counter()
        run()  # warm-up (allocations, autotuning, compile)
        if warmups is not None:
            warmups[name] = time.perf_counter() - start
    rates = {name: [] for name in runs}
    for turn in range(repeats):
        print(f"  turn {turn + 1}/{repeats}", end='\r', file=sys.stderr, flush=True)  # minutes of silence otherwise
        for name, run in runs.items():
            if device == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device == 'cuda':
                torch.cuda.synchronize()
            rates[name].append(count / (time.perf_counter() - start))
    return rates


def compare(rates):
    """(mirim's median rate, HF's median rate or None, the median of the per-turn ratios or None) of
    timed_turns' rates. The ratio of neighbouring turns is steadier than the ratio of the medians on
    a noisy machine."""
    ours, theirs = rates['mirim'], rates.get('hf')
    if theirs is None:
        return statistics.median(ours), None, None
    ratio = statistics.median(a / b for a, b in zip(ours, theirs))
    return statistics.median(ours), statistics.median(theirs), ratio


def build_mirim():
    """The benchmarked model; a shape or device that cannot be is one error line."""
    try:
        return make_mirim()
    except (ValueError, RuntimeError) as e:
        sys.exit(f"bench.py: error: {str(e).splitlines()[0]}")


def make_mirim():
    from mirim.common import resolve_device
    resolve_device(device)  # a device that is not there: a clear ValueError
    if model:
        config = config_from_preset(model, block_size=block_size)
    else:
        config = LlamaConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                             n_kv_head=n_kv_head, n_embd=n_embd, ffn_hidden=ffn_hidden, activation=activation,
                             tie_embeddings=True)
    return Llama(config, seed=seed).to(device)


def build_hf_twin(mirim):
    """The same shape and weights as a transformers LlamaForCausalLM (sdpa attention), or None."""
    try:
        from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
        from mirim.hf import hf_config, to_hf_state_dict
    except ImportError as e:
        print(f"(no Hugging Face comparison: {e})", file=sys.stderr)
        return None
    twin = LlamaForCausalLM(HFConfig(**hf_config(mirim.config)))
    twin.config._attn_implementation = 'sdpa'
    missing, unexpected = twin.load_state_dict(to_hf_state_dict(mirim.state_dict(), mirim.config), strict=False)
    assert not unexpected and set(missing) <= {'lm_head.weight'}, (missing, unexpected)
    twin.tie_weights()
    return twin.to(device)


def train_run(net, is_hf, optimizer_name=None):
    """A function doing train_steps optimizer steps of net on random tokens; optimizer_name: train.py's
    optimizer ('adamw' | 'muon', through optim.make_optimizer) instead of one AdamW over everything."""
    net.train()
    if optimizer_name:
        from mirim.optim import make_optimizer
        optimizer = make_optimizer(net, optimizer_name, 1e-4, 0.1, (0.9, 0.95), device, muon_lr=1e-3,
                                   ns_dtype=ns_dtype)
    else:
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                      fused=device in ('cuda', 'cpu'))  # as train.py's optimizer
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, net.config.vocab_size, (batch_size, block_size + 1), generator=generator).to(device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')

    def step():
        with autocast:
            if is_hf:
                loss = net(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
            else:
                loss = net(tokens[:, :-1], tokens[:, 1:], return_logits=False)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run():
        for _ in range(train_steps):
            step()
    return run


def optimizer_steps(net):
    """What a Muon step adds, taken apart: {'muon', 'adamw'}: runs of optimizer.step() alone (after one backward on
    random tokens, the gradients kept), for timed_turns; the GFLOP of the Muon step's matrix products (torch's
    FLOP counter: the Newton-Schulz iterations); this device's GFLOP/s on a 2048 x 2048 float32 matmul; the
    dtype the Newton-Schulz iterations ran in."""
    from torch.utils.flop_counter import FlopCounterMode
    from mirim.optim import make_optimizer
    tokens = torch.randint(0, net.config.vocab_size, (batch_size, block_size + 1),
                           generator=torch.Generator().manual_seed(seed)).to(device)
    optimizers = {}
    for name in ('adamw', 'muon'):
        model = copy.deepcopy(net)
        model(tokens[:, :-1], tokens[:, 1:], return_logits=False)[1].backward()
        optimizers[name] = make_optimizer(model, name, 1e-4, 0.1, (0.9, 0.95), device, muon_lr=1e-3,
                                          ns_dtype=ns_dtype)
    with FlopCounterMode(display=False) as counter:
        optimizers['muon'].step()
    a = torch.randn(2048, 2048, device=device)
    rate = timed_turns({'matmul': lambda: a @ a}, 2 * 2048 ** 3 / 1e9, 5)['matmul']
    muon_dtype = next(g['ns_dtype'] for g in optimizers['muon'].param_groups if g['use_muon'])
    return ({name: o.step for name, o in optimizers.items()}, counter.get_total_flops() / 1e9,
            statistics.median(rate), muon_dtype)


@torch.no_grad()
def generate_run(net, is_hf):
    """A function generating new_tokens greedy tokens at batch 1."""
    net.eval()
    prompt = torch.randint(0, net.config.vocab_size, (1, prompt_tokens),
                           generator=torch.Generator().manual_seed(seed)).to(device)
    if is_hf:
        run = lambda: net.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
    else:
        run = lambda: generate(net, prompt, new_tokens, temperature=0)
    return run


def loop_rates():
    """train.py's tokens/s on loop_config against the bare step of the same model and batch."""
    import json
    import subprocess
    import tempfile
    from mirim.configurator import configure
    from mirim import train_config
    cfg = configure(train_config.DEFAULTS, [loop_config])
    from mirim.init_from import requested_model_config
    from mirim.shards import load_meta
    net = Llama(requested_model_config(cfg, load_meta(cfg['data_dir'])), seed=seed)  # the model train.py builds
    global batch_size, block_size
    batch_size, block_size = cfg['batch_size'] * cfg['gradient_accumulation_steps'], cfg['block_size']
    bare = statistics.median(timed_turns({'bare': train_run(net, False)}, batch_size * block_size * train_steps,
                                         repeats)['bare'])
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, 'train.py', loop_config, f'--out_dir={out}', f'--max_iters={loop_iters}',
                        f'--eval_interval={loop_iters}', '--log_interval=10', '--max_time=0', f'--dtype={dtype}',
                        '--wandb_log=False'], check=True, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    # the first interval holds the warm-up, the last one the final evaluation and checkpoint
    rates = [r['tokens_per_sec'] for r in records if r.get('tokens_per_sec')]
    return statistics.median(rates[1:-1] or rates), bare


def prompts_rates(net):
    """New tokens/s of sample.py's prompts-file path, batched and one prompt at a time (the bench
    shape with the bytes tokenizer's 261-token vocab, random weights)."""
    from mirim.sampling import sample_prompts
    from mirim.tokenizer import load_tokenizer
    tokenizer = load_tokenizer('bytes')
    net = Llama(LlamaConfig(**{**vars(net.config), 'vocab_size': tokenizer.vocab_size}),
                seed=seed).to(device).eval()
    words = "no princípio criou deus os céus e a terra e a terra era sem forma e vazia".split()
    prompts = [' '.join(words[:1 + i % len(words)]) for i in range(num_prompts)]

    def rate(batch):
        start = time.perf_counter()
        records = sample_prompts(net, tokenizer, prompts, max_new_tokens=new_tokens, temperature=0, seed=seed,
                                 batch_size=batch, progress=False)
        return sum(len(r['tokens']) for r in records) / (time.perf_counter() - start)
    return rate(prompt_batch), rate(1)


def serve_rates(net):
    """{(clients, max_batch, temperatures): [(completion tokens/s, median seconds to the first token) of each
    turn]} of serve.py (the bench shape with the bytes tokenizer's vocab, random weights: no reply ends early).
    The settings take turns (`repeats` turns, at most 3), so that ratios are of runs side by side."""
    import http.client
    import json
    import tempfile
    import threading
    from dataclasses import asdict
    from mirim import server as serve
    from mirim.tokenizer import load_tokenizer
    tokenizer = load_tokenizer('bytes')
    net = Llama(LlamaConfig(**{**vars(net.config), 'vocab_size': tokenizer.vocab_size}), seed=seed)
    results = {}
    turns = [(1, 32, 1), (8, 32, 1), (32, 32, 1), (32, 32, 4), (32, 1, 1)] * min(repeats, 3)
    with tempfile.TemporaryDirectory() as out:
        torch.save({'model': net.state_dict(), 'model_config': asdict(net.config), 'tokenizer': tokenizer.to_dict()},
                   os.path.join(out, 'ckpt.pt'))
        for clients, max_batch, temperatures in turns:
            server = serve.build_server(out, port=0, quiet=True, max_batch=max_batch, device=device)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            firsts, lock = [], threading.Lock()

            def client(k):
                conn = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=3600)
                for i in range(k, num_prompts, clients):
                    body = {'prompt': f'Era uma vez {i}', 'max_tokens': new_tokens, 'stream': True,
                            'temperature': (1.0, 0.7, 1.3, 0.9)[i % temperatures]}
                    start = time.perf_counter()
                    conn.request('POST', '/v1/completions', json.dumps(body), {'Content-Type': 'application/json'})
                    response, first = conn.getresponse(), None
                    for line in response:
                        if first is None and line.startswith(b'data: {'):  # the first piece, or the end
                            first = time.perf_counter() - start
                    with lock:
                        firsts.append(first)
            client_threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
            start = time.perf_counter()
            for t in client_threads:
                t.start()
            for t in client_threads:
                t.join()
            elapsed = time.perf_counter() - start
            results.setdefault((clients, max_batch, temperatures), []).append(
                (server.engine.stats['completion_tokens'] / elapsed, statistics.median(firsts)))
            server.shutdown()
            server.server_close()
    return results


def gguf_rows(net, tok, data):
    """{name: (bytes on disk, new tokens/s of each turn, val bpb or None, greedy tokens equal to mirim's)}
    for mirim fp32 and llama.cpp on each of gguf_types; and eval.py's metrics of mirim (None: no data)."""
    import itertools
    import tempfile
    import numpy as np
    import llama_cpp
    from eval import LN2, evaluate_split, loss_windows
    from mirim.gguf_export import write_gguf
    from mirim.shards import open_split
    net, context, n_threads = net.to('cpu', torch.float32).eval(), net.config.block_size, torch.get_num_threads()
    if prompt_tokens + new_tokens > context:  # llama.cpp's context is the model's: no window to slide
        raise ValueError(f"prompt_tokens + new_tokens must fit in the model's block_size ({context})")
    prompt = torch.randint(0, tok.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    outputs, bpb, metrics = {}, {}, None

    def mirim_run():
        outputs['mirim fp32'] = generate(net, prompt, new_tokens, temperature=0)[0, prompt_tokens:].tolist()

    def llama_run(name, llm):
        def run():
            llm.reset()  # no prompt cache from the turn before: every turn prefills, as mirim's does
            outputs[name] = list(itertools.islice(llm.generate(prompt[0].tolist(), temp=0.0), new_tokens))
        return run

    runs, sizes = {'mirim fp32': mirim_run}, {'mirim fp32': net.num_params(non_embedding=False) * 4}
    if data:
        metrics = evaluate_split(net, tok, data, 'val', context)
        _, _, sequences, _ = open_split(data, 'val')
        bpb['mirim fp32'] = metrics['bpb']
    with tempfile.TemporaryDirectory() as folder:
        for qtype in gguf_types.split(','):
            name, path = f'llama.cpp {qtype}', os.path.join(folder, f'{qtype}.gguf')
            write_gguf(net, tok, path, qtype, log=lambda *_: None)
            sizes[name] = os.path.getsize(path)
            settings = dict(model_path=path, n_ctx=context, n_batch=context, n_threads=n_threads,
                            n_threads_batch=n_threads, verbose=False)
            runs[name] = llama_run(name, llama_cpp.Llama(**settings))
            if metrics and metrics['bpb'] is not None:
                scorer, nll = llama_cpp.Llama(**settings, logits_all=True), 0.0
                for i, start, count in loss_windows([len(s) for s in sequences], context):  # eval.py's windows
                    ids = np.asarray(sequences[i][start:start + count + 1], dtype=np.int64)
                    scorer.reset()
                    scorer.eval(ids[:-1].tolist())
                    logits = torch.from_numpy(scorer.scores[:count]).double()
                    nll -= logits.log_softmax(-1)[torch.arange(count), torch.from_numpy(ids[1:])].sum().item()
                bpb[name] = nll / (LN2 * metrics['bytes'])
        rates = timed_turns(runs, new_tokens, repeats)
    same = {name: sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1],
                                                     zip(tokens, outputs['mirim fp32'])))
            for name, tokens in outputs.items()}
    return {name: (sizes[name], rates[name], bpb.get(name), same[name]) for name in runs}, metrics


def same_logits(mirim, twin):
    tokens = torch.randint(0, mirim.config.vocab_size, (2, min(64, block_size)),
                           generator=torch.Generator().manual_seed(0)).to(device)
    mirim.eval(), twin.eval()
    with torch.no_grad():
        diff = (mirim(tokens)[0] - twin(tokens).logits).abs().max().item()
    return diff


if __name__ == '__main__':
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    print(f"device {device} ({torch.get_num_threads()} threads), dtype {dtype}, torch {torch.__version__}, "
          f"compile {'on' if compile else 'off'} (mirim)")
    rows = []
    if what == 'loop':
        loop, bare = loop_rates()
        print(f"{loop_config}: batch {batch_size} x {block_size}; loop overhead over the bare step: {bare / loop - 1:.1%}")
        rows += [('train.py loop tokens/s', loop, None, None), ('bare step tokens/s (same batch)', bare, None, None)]
    elif what == 'optimizer':
        net = build_mirim()
        runs = {name: train_run(copy.deepcopy(net), False, name) for name in ('adamw', 'muon')}
        rates = timed_turns(runs, train_steps * batch_size * block_size, repeats)
        costs = sorted(a / m for m, a in zip(rates['muon'], rates['adamw']))  # a Muon step's time over AdamW's
        ms = {name: 1000 * batch_size * block_size / statistics.median(r) for name, r in rates.items()}
        print(f"{net.num_params(non_embedding=False) / 1e6:.2f}M params, batch {batch_size} x {block_size} "
              f"({batch_size * block_size:,} tokens a step); {repeats} paired turns of {train_steps} steps\n"
              f"a Muon step takes {statistics.median(costs):.3f}x an AdamW step (median of the turns; "
              f"turns {costs[0]:.3f}-{costs[-1]:.3f}): {ms['muon']:.1f} against {ms['adamw']:.1f} ms a step")
        rows += [(f'train tokens/s, {name}', statistics.median(r), None, None) for name, r in rates.items()]
        steps, gflop, peak, muon_dtype = optimizer_steps(net)
        step_ms = {name: 1000 / statistics.median(r) for name, r in timed_turns(steps, 1, repeats).items()}
        print(f"optimizer.step() alone: Muon {step_ms['muon']:.1f} ms (Newton-Schulz in {muon_dtype}), AdamW {step_ms['adamw']:.1f} ms; the Muon step's "
              f"products are {gflop:.3g} GFLOP ({gflop / (step_ms['muon'] - step_ms['adamw']) * 1000:.3g} GFLOP/s over what "
              f"it adds); a 2048 x 2048 float32 matmul runs at {peak:.0f} GFLOP/s here, so those products take at least "
              f"{1000 * gflop / peak:.1f} ms ({gflop / peak / (ms['adamw'] / 1000):.0%} of an AdamW training step)")
    elif what == 'prompts':
        batched, single = prompts_rates(build_mirim())
        print(f"{num_prompts} prompts x {new_tokens} new tokens, greedy: batched {batched / single:.1f}x one at a time")
        rows += [(f'prompts, batch_size={prompt_batch} new tok/s', batched, None, None),
                 ('prompts, batch_size=1 new tok/s', single, None, None)]
    elif what == 'serve':
        rates = serve_rates(build_mirim())
        single = [rate for rate, _ in rates[32, 1, 1]]
        span = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}"
        for (clients, max_batch, temperatures), turns in rates.items():
            label = (f"serve, {clients} clients" + (", one at a time" if max_batch == 1 else "") +
                     (f", {temperatures} temperatures" if temperatures > 1 else ""))
            rate = statistics.median(r for r, _ in turns)
            print(f"{label:38s}{rate:8.0f} completion tok/s (x one at a time, per turn: "
                  f"{span([r / s for (r, _), s in zip(turns, single)])}), median first token "
                  f"{statistics.median(f for _, f in turns) * 1000:.0f} ms")
            rows.append((label + ' tok/s', rate, None, None))
        mixed = [m / o for (m, _), (o, _) in zip(rates[32, 32, 4], rates[32, 32, 1])]
        print(f"32 clients with 4 temperatures / with one, per turn: {span(mixed)}")
    elif what == 'gguf':
        try:
            if out_dir:
                from mirim.checkpoint import load_model
                net, tok, ckpt = load_model(out_dir)
                data = data_dir or ckpt.get('data_dir') or (ckpt.get('config') or {}).get('data_dir') or ''
            else:
                from mirim.tokenizer import load_tokenizer
                net, tok, data = build_mirim(), load_tokenizer('bytes'), data_dir
            import llama_cpp
            cfg = net.config
            print(f"{out_dir or 'random weights'}: {net.num_params(non_embedding=False) / 1e6:.2f}M params, vocab "
                  f"{cfg.vocab_size}, mlp {cfg.ffn_hidden} {cfg.activation}; llama-cpp-python {llama_cpp.__version__} "
                  f"on the CPU with torch's threads; batch 1, {prompt_tokens} prompt + {new_tokens} new tokens, "
                  f"greedy, {repeats} paired turns")
            table, metrics = gguf_rows(net, tok, data)
        except ImportError as e:
            sys.exit(f"bench.py: error: --what=gguf needs llama-cpp-python ({e}; README: GGUF)")
        except (OSError, ValueError) as e:
            sys.exit(f"bench.py: error: {e}")
        print(f"\nval bpb: {data}, {metrics['tokens']:,} tokens in windows of {cfg.block_size}" if metrics else
              "\nval bpb: no data (--data_dir=)")
        mirim_rates = table['mirim fp32'][1]
        print(f"\n{'':18s}{'MB on disk':>11s}{'new tok/s':>11s}{'vs mirim':>10s}{'val bpb':>9s}{'greedy = mirim':>16s}")
        for name, (size, rates, bpb, same) in table.items():
            ratio = statistics.median(r / m for r, m in zip(rates, mirim_rates))
            print(f"{name:18s}{size / 1e6:11.1f}{statistics.median(rates):11.0f}{ratio:9.2f}x"
                  f"{'-' if bpb is None else f'{bpb:.4f}':>9s}{f'{same}/{new_tokens}':>16s}")
    else:
        mirim = build_mirim()
        cfg = mirim.config
        print(f"shape: vocab {cfg.vocab_size}, width {cfg.n_embd}, layers {cfg.n_layer}, heads {cfg.n_head}/"
              f"{cfg.n_kv_head} kv, mlp {cfg.ffn_hidden} {cfg.activation}, "
              f"{mirim.num_params(non_embedding=False) / 1e6:.2f}M params; batch {batch_size} x {block_size}")
        twin = build_hf_twin(mirim)
        if twin is not None:
            import transformers
            print(f"HF: transformers {transformers.__version__}; max |logit difference| mirim vs HF on the same "
                  f"weights: {same_logits(mirim, twin):.2e}")
        if what in ('train', 'all'):
            runs = {'mirim': train_run(torch.compile(mirim) if compile else mirim, False)}
            if compile:  # the peer that says whether compiling pays: the same model and weights, eager
                runs['eager'] = train_run(copy.deepcopy(mirim), False)
            if twin is not None:
                runs['hf'] = train_run(twin, True)
            warmups = {}
            rates = timed_turns(runs, train_steps * batch_size * block_size, repeats, warmups)
            ours, theirs, ratio = compare(rates)
            rows.append(('train tokens/s', ours, theirs, ratio))
            if compile:
                gains = sorted(c / e for c, e in zip(rates['mirim'], rates['eager']))
                step = {name: batch_size * block_size / statistics.median(rates[name]) for name in ('mirim', 'eager')}
                seconds = warmups['mirim'] - warmups['eager']  # the first steps' extra time: compiling
                saved = step['eager'] * (1 - 1 / statistics.median(gains))  # the paired ratio: steadier than two medians
                pays = (f"pays for itself after {seconds / saved:,.0f} steps ({seconds / saved * step['eager'] / 60:.1f} "
                        f"minutes of eager training)" if saved > 0 else "does not pay at this shape")
                print(f"torch.compile: {seconds:.0f} s compiling, then a step {statistics.median(gains):.2f}x as fast "
                      f"as eager (median of the turns; turns {gains[0]:.2f}-{gains[-1]:.2f}; {1000 * step['mirim']:.0f} "
                      f"against {1000 * step['eager']:.0f} ms): {pays}")
                rows.append(('train tokens/s, mirim eager', statistics.median(rates['eager']), None, None))
            if peak_flops:
                print(f"training MFU: {mirim.estimate_mfu(ours, peak_flops, block_size):.1%}")
        if what in ('generate', 'all'):
            if dtype == 'bfloat16':  # generation runs on bf16 weights, training on fp32 weights with autocast
                mirim, twin = mirim.to(torch.bfloat16), twin.to(torch.bfloat16) if twin is not None else None
            runs = {'mirim': generate_run(mirim, False)}
            if twin is not None:
                runs['hf'] = generate_run(twin, True)
            ours, theirs, ratio = compare(timed_turns(runs, new_tokens, repeats))
            rows.append(('generate new tokens/s (batch 1)', ours, theirs, ratio))
    if rows:
        print(f"\n{'':34s}{'mirim':>12s}{'HF':>12s}{'mirim/HF':>10s}")
    for name, ours, theirs, ratio in rows:
        hf = f"{theirs:12.0f}{ratio:9.2f}x" if theirs else f"{'-':>12s}{'-':>10s}"
        print(f"{name:34s}{ours:12.0f}{hf}")
