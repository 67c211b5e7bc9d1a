"""
How far llama.cpp's logits are from mirim's on a trained model, per GGUF type: writes f32, f16, q8_0
and q4_0 files of a checkpoint (export.py --format=gguf's writer) into a temporary folder, runs
windows of the model's validation data through llama.cpp (llama-cpp-python) and through mirim, and
prints, per type, the range over windows of the largest |logit difference| in a window, with
llama.cpp's default f16 KV cache and with an f32 one (which tells the cache's share), and how often
the top token agrees. This is where the README's GGUF tolerances come from.

    python tools/gguf_logits.py --out_dir=out/biblia-pt                # ckpt.pt, its data_dir's val split
    python tools/gguf_logits.py --out_dir=out/x --windows=8 --window=128 --threads=2
"""
import os
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mirim.checkpoint import load_model  # noqa: E402
from mirim.configurator import settings  # noqa: E402
from mirim.gguf_export import GGUF_TYPES, write_gguf  # noqa: E402
from mirim.shards import open_split  # noqa: E402

DEFAULTS = dict(
    out_dir='out',            # a training out_dir or checkpoint file (a GGUF-able model: SwiGLU, or tied GeGLU)
    checkpoint='ckpt.pt',     # file inside out_dir
    data_dir='',              # '' = the data set the checkpoint was trained on; its val split is read
    windows=6,                # how many windows of validation tokens
    window=128,               # tokens per window (at most the model's block_size)
    threads=1,                # llama.cpp threads (torch gets the same)
    types='f32,f16,q8_0,q4_0',
)


def val_windows(data_dir, count, length):
    """count windows of length tokens spread evenly over the val split's first shard."""
    _, _, shards, _ = open_split(data_dir, 'val')
    ids = np.asarray(shards[0], dtype=np.int64)
    starts = np.linspace(0, len(ids) - length - 1, count).astype(int)
    return [ids[s:s + length].tolist() for s in starts]


def llama_cpp_logits(path, ids, threads, f32_cache):
    import llama_cpp
    cache = {'type_k': llama_cpp.GGML_TYPE_F32, 'type_v': llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(ids), n_batch=len(ids), n_ubatch=len(ids), logits_all=True,
                          n_threads=threads, verbose=False, **cache)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def main(argv):
    config = settings(DEFAULTS, argv)
    torch.set_num_threads(config.threads)
    model, tok, ckpt = load_model(config.out_dir, checkpoint=config.checkpoint)
    data_dir = config.data_dir or ckpt.get('data_dir') or (ckpt.get('config') or {}).get('data_dir')
    length = min(config.window, model.config.block_size)
    windows = val_windows(data_dir, config.windows, length)
    with torch.no_grad():
        expected = [model(torch.tensor([w]))[0][0].numpy() for w in windows]
    spread = max(float(np.abs(e).max()) for e in expected)
    c = model.config
    print(f"{config.out_dir}: {c.activation}, {'tied' if c.tie_embeddings else 'untied'}, {c.n_layer} layers x "
          f"{c.n_embd}, step {ckpt.get('step')}; {len(windows)} windows of {length} val tokens of {data_dir}; "
          f"mirim's logits reach |{spread:.1f}|")
    print("type  | max |logit diff| per window, f16 KV cache (default) | same, f32 KV cache | top-1 = mirim")
    with tempfile.TemporaryDirectory() as folder:
        for qtype in config.types.split(','):
            assert qtype in GGUF_TYPES, qtype
            path = os.path.join(folder, f'm-{qtype}.gguf')
            write_gguf(model, tok, path, qtype, log=lambda *a: None)
            row = []
            for f32_cache in (False, True):
                diffs, agree, total = [], 0, 0
                for w, e in zip(windows, expected):
                    got = llama_cpp_logits(path, w, config.threads, f32_cache)
                    diffs.append(float(np.abs(got - e).max()))
                    agree += int((got.argmax(-1) == e.argmax(-1)).sum())
                    total += len(w)
                row.append((min(diffs), max(diffs), agree, total))
            (lo, hi, agree, total), (lo32, hi32, _, _) = row
            print(f"{qtype:5} | {lo:.2e} .. {hi:.2e} | {lo32:.2e} .. {hi32:.2e} | {agree}/{total}")


if __name__ == '__main__':
    main(sys.argv[1:])
