"""
The Hugging Face mapping, both ways: mirim's Llama <-> transformers' LlamaForCausalLM (weights and
config.json), and reading a local Hugging Face Llama folder into mirim (load_hf), for continued
pre-training (train.py init_from=<folder>), sampling or evaluation:

    from hf import load_hf
    model, tokenizer = load_hf('TeenyTinyLlama-160m')   # a mirim Llama and Tokenizer

mirim's Llama is Hugging Face's layout with two projections fused: q, k, v are one matrix
(wqkv) and gate, up are one matrix (w13). Moving weights is splitting or concatenating rows.
Anything mirim does not implement (rope scaling, biases, another head size, ...) is refused by
name: a model that loads must compute the same function. Writing a whole folder is export.py's job.
"""
import json
import os

import torch

from model import Llama, LlamaConfig

# mirim's activation name -> Hugging Face's hidden_act for the same function
HF_ACTIVATION = {'silu': 'silu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh'}
# the same for a Gemma config.json: transformers' GemmaConfig reads hidden_act="gelu" as the tanh form (a
# legacy value of Google's releases, rewritten to gelu_pytorch_tanh), so exact-erf GELU is written as
# gelu_python, transformers' other name for it (x/2 (1 + erf(x/sqrt 2)), which it leaves as it is)
GEMMA_ACTIVATION = {'gelu': 'gelu_python', 'gelu_tanh': 'gelu_pytorch_tanh'}

# -----------------------------------------------------------------------------
# weights: mirim names <-> Hugging Face names

def to_hf_state_dict(state_dict, config, dtype=torch.float32):
    """mirim state dict -> LlamaForCausalLM tensors (fused projections split). A tied head is not
    written: transformers ties lm_head to embed_tokens itself (tie_word_embeddings in config.json)."""
    c = config
    q_rows, kv_rows = c.n_head * c.head_size, c.n_kv_head * c.head_size
    out = {'model.embed_tokens.weight': state_dict['tok_embeddings.weight'],
           'model.norm.weight': state_dict['norm.weight']}
    if not c.tie_embeddings:
        out['lm_head.weight'] = state_dict['output.weight']
    for i in range(c.n_layer):
        mirim, hf = f'layers.{i}.', f'model.layers.{i}.'
        q, k, v = state_dict[mirim + 'attention.wqkv.weight'].split([q_rows, kv_rows, kv_rows])
        gate, up = state_dict[mirim + 'feed_forward.w13.weight'].split([c.ffn_hidden, c.ffn_hidden])
        out.update({
            hf + 'input_layernorm.weight': state_dict[mirim + 'attention_norm.weight'],
            hf + 'self_attn.q_proj.weight': q, hf + 'self_attn.k_proj.weight': k,
            hf + 'self_attn.v_proj.weight': v, hf + 'self_attn.o_proj.weight': state_dict[mirim + 'attention.wo.weight'],
            hf + 'post_attention_layernorm.weight': state_dict[mirim + 'ffn_norm.weight'],
            hf + 'mlp.gate_proj.weight': gate, hf + 'mlp.up_proj.weight': up,
            hf + 'mlp.down_proj.weight': state_dict[mirim + 'feed_forward.w2.weight'],
        })
    # safetensors wants each tensor in its own contiguous storage (the splits above are views)
    return {name: t.detach().to('cpu', dtype).contiguous().clone() for name, t in out.items()}


# names that old transformers versions saved as buffers: derived from the config, safe to skip
IGNORED_HF_SUFFIXES = ('rotary_emb.inv_freq',)


def from_hf_state_dict(tensors, config, dtype=torch.float32):
    """LlamaForCausalLM tensors -> mirim state dict (projections fused). Every tensor must be used
    and have the shape config implies; otherwise ValueError naming the tensors."""
    c = config
    expected = {'model.embed_tokens.weight': (c.vocab_size, c.n_embd), 'model.norm.weight': (c.n_embd,)}
    if not c.tie_embeddings:
        expected['lm_head.weight'] = (c.vocab_size, c.n_embd)
    for i in range(c.n_layer):
        hf = f'model.layers.{i}.'
        expected.update({
            hf + 'input_layernorm.weight': (c.n_embd,), hf + 'post_attention_layernorm.weight': (c.n_embd,),
            hf + 'self_attn.q_proj.weight': (c.n_head * c.head_size, c.n_embd),
            hf + 'self_attn.k_proj.weight': (c.n_kv_head * c.head_size, c.n_embd),
            hf + 'self_attn.v_proj.weight': (c.n_kv_head * c.head_size, c.n_embd),
            hf + 'self_attn.o_proj.weight': (c.n_embd, c.n_head * c.head_size),
            hf + 'mlp.gate_proj.weight': (c.ffn_hidden, c.n_embd), hf + 'mlp.up_proj.weight': (c.ffn_hidden, c.n_embd),
            hf + 'mlp.down_proj.weight': (c.n_embd, c.ffn_hidden),
        })
    names = {n for n in tensors if not n.endswith(IGNORED_HF_SUFFIXES)}
    extra = set(names) - set(expected)
    if c.tie_embeddings and 'lm_head.weight' in extra:
        # some tied checkpoints store the head anyway: fine when it really is the embedding
        if not torch.equal(tensors['lm_head.weight'], tensors['model.embed_tokens.weight']):
            raise ValueError("config.json says tie_word_embeddings=true but lm_head.weight differs from "
                             "model.embed_tokens.weight")
        extra.discard('lm_head.weight')
    missing = sorted(set(expected) - names)
    if extra or missing:
        raise ValueError(f"the weights do not match a LlamaForCausalLM of this config.json: "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected {sorted(extra)[:8]}{' ...' if len(extra) > 8 else ''}")
    wrong = [f"{n} {tuple(tensors[n].shape)} (expected {shape})" for n, shape in expected.items()
             if tuple(tensors[n].shape) != shape]
    if wrong:
        raise ValueError(f"tensor shapes do not match config.json: {'; '.join(wrong[:8])}")

    def get(name):
        return tensors[name].to(dtype)

    sd = {'tok_embeddings.weight': get('model.embed_tokens.weight'), 'norm.weight': get('model.norm.weight')}
    sd['output.weight'] = sd['tok_embeddings.weight'] if c.tie_embeddings else get('lm_head.weight')
    for i in range(c.n_layer):
        mirim, hf = f'layers.{i}.', f'model.layers.{i}.'
        sd[mirim + 'attention_norm.weight'] = get(hf + 'input_layernorm.weight')
        sd[mirim + 'attention.wqkv.weight'] = torch.cat([get(hf + f'self_attn.{p}_proj.weight') for p in 'qkv'])
        sd[mirim + 'attention.wo.weight'] = get(hf + 'self_attn.o_proj.weight')
        sd[mirim + 'ffn_norm.weight'] = get(hf + 'post_attention_layernorm.weight')
        sd[mirim + 'feed_forward.w13.weight'] = torch.cat([get(hf + 'mlp.gate_proj.weight'),
                                                           get(hf + 'mlp.up_proj.weight')])
        sd[mirim + 'feed_forward.w2.weight'] = get(hf + 'mlp.down_proj.weight')
    return sd


# -----------------------------------------------------------------------------
# GeGLU models as Gemma. transformers' Llama takes hidden_act=gelu_pytorch_tanh, but vLLM's Llama
# and llama.cpp's converter compute every Llama as SwiGLU. Gemma is a GELU-gated Llama that all of
# them implement; it differs in three places, each compensated exactly: it multiplies the input
# embedding by sqrt(hidden) (store the embedding divided by it), its RMSNorm multiplies by
# (1 + weight) (store weight - 1), and its head is always the embedding (so a tied model only: the
# final norm's gain takes the sqrt(hidden) back, stored as gain * sqrt(hidden) - 1).

def as_gemma(config):
    """Whether the export writes this model as GemmaForCausalLM."""
    return config.activation != 'silu' and config.tie_embeddings


def to_gemma_tensors(tensors, config):
    """LlamaForCausalLM tensors (to_hf_state_dict's) -> GemmaForCausalLM tensors of the same function."""
    scale = config.n_embd ** 0.5
    out = {}
    for name, t in tensors.items():
        if name == 'model.embed_tokens.weight':
            t = t / scale
        elif name == 'model.norm.weight':
            t = t * scale - 1
        elif name.endswith('layernorm.weight'):
            t = t - 1
        out[name] = t.contiguous()
    return out


def from_gemma_tensors(tensors, hidden_size):
    """The inverse of to_gemma_tensors, for any Gemma folder (tied, as Gemma always is)."""
    scale = hidden_size ** 0.5
    out = {}
    for name, t in tensors.items():
        if name == 'model.embed_tokens.weight':
            t = t.float() * scale
        elif name == 'model.norm.weight':
            t = (t.float() + 1) / scale
        elif name.endswith('layernorm.weight'):
            t = t.float() + 1
        out[name] = t
    return out


# -----------------------------------------------------------------------------
# config.json: mirim LlamaConfig <-> Hugging Face LlamaConfig (or GemmaConfig)

def hf_config(config, dtype='float32', gemma=False):
    c = config
    if gemma:  # the same keys (transformers 4.x's Gemma read hidden_activation, 5.x reads hidden_act)
        return {**hf_config(config, dtype), 'architectures': ['GemmaForCausalLM'], 'model_type': 'gemma',
                'hidden_act': GEMMA_ACTIVATION[c.activation], 'hidden_activation': GEMMA_ACTIVATION[c.activation],
                'tie_word_embeddings': True}
    return {
        'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
        'vocab_size': c.vocab_size, 'hidden_size': c.n_embd, 'intermediate_size': c.ffn_hidden,
        'num_hidden_layers': c.n_layer, 'num_attention_heads': c.n_head, 'num_key_value_heads': c.n_kv_head,
        'head_dim': c.head_size, 'hidden_act': HF_ACTIVATION[c.activation],
        'max_position_embeddings': c.block_size, 'rms_norm_eps': c.norm_eps,
        # rope_theta + rope_scaling for transformers 4.x, rope_parameters for 5.x
        'rope_theta': c.rope_theta, 'rope_scaling': None,
        'rope_parameters': {'rope_type': 'default', 'rope_theta': c.rope_theta},
        'tie_word_embeddings': c.tie_embeddings, 'attention_bias': False, 'mlp_bias': False,
        'attention_dropout': 0.0, 'initializer_range': 0.02, 'pretraining_tp': 1, 'use_cache': True,
        'bos_token_id': c.bos_id, 'eos_token_id': c.eos_id, 'pad_token_id': c.pad_id,
        'torch_dtype': dtype, 'dtype': dtype,
    }


def check_types(hf, where):
    """Every other config.json key mirim reads must have its JSON type (a string rope_theta, a 'false' in
    quotes, a rope_parameters that is no object would otherwise be read wrong or fail deep inside):
    ValueError naming `where` and the key."""
    is_id = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    positive = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0  # noqa: E731
    kinds = {  # key -> (test, what it must be); None is always allowed (transformers' default)
        'model_type': (lambda v: isinstance(v, str), 'a string'),
        'architectures': (lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v), 'a list of names'),
        'hidden_act': (lambda v: isinstance(v, str), 'a string'),
        'hidden_activation': (lambda v: isinstance(v, str), 'a string'),
        'tie_word_embeddings': (lambda v: isinstance(v, bool), 'true or false'),
        'attention_bias': (lambda v: isinstance(v, bool), 'true or false'),
        'mlp_bias': (lambda v: isinstance(v, bool), 'true or false'),
        'bos_token_id': (is_id, 'a token id'),
        'pad_token_id': (is_id, 'a token id'),
        'eos_token_id': (lambda v: is_id(v) or (isinstance(v, list) and v and all(map(is_id, v))),
                         'a token id or a list of them'),
        'rope_scaling': (lambda v: isinstance(v, dict), 'an object'),
        'rope_parameters': (lambda v: isinstance(v, dict), 'an object'),
        'partial_rotary_factor': (positive, 'a positive number'),
    }
    nested = {'rope_theta': kinds['partial_rotary_factor'], 'partial_rotary_factor': kinds['partial_rotary_factor'],
              'rope_type': kinds['model_type'], 'type': kinds['model_type']}
    values = [(key, hf.get(key), kinds[key]) for key in kinds]
    for outer in ('rope_parameters', 'rope_scaling'):
        if isinstance(hf.get(outer), dict):
            values += [(f'{outer}.{key}', hf[outer].get(key), nested[key]) for key in nested]
    for key, value, (ok, what) in values:
        if value is not None and not ok(value):
            raise ValueError(f"{where}: '{key}' is {value!r}, not {what}")


def config_from_hf(hf, where='config.json'):
    """A Hugging Face config.json dict -> mirim LlamaConfig, refusing what mirim cannot compute. ValueError
    naming `where` (the file) and the key: a size that is no positive whole number, a key missing, ..."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where}: holds a JSON {type(hf).__name__}, not a model's config object")
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0  # noqa: E731
    for key in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads'):
        if key not in hf:
            raise ValueError(f"{where}: no '{key}', which every Llama config.json has")
    for key, ok, what in [(k, whole, 'a positive whole number') for k in (
            'vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
            'num_key_value_heads', 'head_dim', 'max_position_embeddings')] + [
            (k, number, 'a positive number') for k in ('rms_norm_eps', 'rope_theta')]:
        required = key in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads')
        if (required or hf.get(key) is not None) and not ok(hf[key]):
            raise ValueError(f"{where}: '{key}' is {hf[key]!r}, not {what}")
    check_types(hf, where)
    problems = []
    gemma = hf.get('model_type') == 'gemma'  # a GELU-gated Llama (see as_gemma)
    if hf.get('model_type') not in ('llama', 'gemma'):
        problems.append(f"model_type={hf.get('model_type')!r} (only 'llama' and 'gemma' are supported)")
    architectures = hf.get('architectures') or ['GemmaForCausalLM' if gemma else 'LlamaForCausalLM']
    if architectures not in (['LlamaForCausalLM'], ['GemmaForCausalLM']):
        problems.append(f"architectures={architectures} (only LlamaForCausalLM and GemmaForCausalLM)")
    activations = {hf_name: name for name, hf_name in HF_ACTIVATION.items()}
    activations['gelu_python'] = 'gelu'  # exact GELU too (what a Gemma export of it writes)
    if gemma:  # hidden_activation when given (transformers 4.x); a Gemma's hidden_act="gelu" is the tanh form
        hidden_act = hf.get('hidden_activation') or hf.get('hidden_act') or 'gelu_pytorch_tanh'
        if not hf.get('hidden_activation') and hidden_act == 'gelu':
            hidden_act = 'gelu_pytorch_tanh'
    else:
        hidden_act = hf.get('hidden_act', 'silu')
    if hidden_act not in activations:
        problems.append(f"hidden_act={hidden_act!r} (supported: {sorted(activations)})")
    for flag in ('attention_bias', 'mlp_bias'):
        if hf.get(flag):
            problems.append(f"{flag}=true (mirim's projections have no biases)")
    hidden, heads = hf['hidden_size'], hf['num_attention_heads']
    head_dim = hf.get('head_dim') or hidden // heads
    if head_dim * heads != hidden:
        problems.append(f"head_dim={head_dim} with hidden_size={hidden}, num_attention_heads={heads} "
                        f"(mirim needs head_dim = hidden_size / num_attention_heads)")
    # rope: transformers 4.x writes rope_theta + rope_scaling, 5.x writes rope_parameters
    rope = dict(hf.get('rope_parameters') or {})
    scaling = hf.get('rope_scaling')
    if scaling and scaling.get('rope_type', scaling.get('type')) != 'default':
        problems.append(f"rope_scaling={scaling} (mirim implements plain RoPE only)")
    if rope.get('rope_type', 'default') != 'default':
        problems.append(f"rope_parameters={rope} (mirim implements plain RoPE only)")
    if rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0)) != 1.0:
        problems.append("partial_rotary_factor != 1 (mirim rotates the whole head)")
    for key in ('sliding_window', 'layer_types'):
        if hf.get(key):
            problems.append(f"{key}={hf[key]!r} (mirim uses full attention in every layer)")
    if problems:
        raise ValueError(f"cannot import {where} into mirim: " + "; ".join(problems))
    eos = hf.get('eos_token_id', 2)
    return LlamaConfig(
        vocab_size=hf['vocab_size'], block_size=hf.get('max_position_embeddings', 2048),
        n_layer=hf['num_hidden_layers'], n_head=heads, n_kv_head=hf.get('num_key_value_heads') or heads,
        n_embd=hidden, ffn_hidden=hf['intermediate_size'], activation=activations[hidden_act],
        rope_theta=float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
        norm_eps=hf.get('rms_norm_eps', 1e-6),  # transformers' defaults for absent keys
        tie_embeddings=bool(hf.get('tie_word_embeddings', gemma)), dropout=0.0,
        bos_id=hf.get('bos_token_id', 1), eos_id=eos[0] if isinstance(eos, list) else eos,
        pad_id=hf.get('pad_token_id'))


# -----------------------------------------------------------------------------
# import

def read_hf_tensors(path):
    """All tensors of a Hugging Face folder: model.safetensors, pytorch_model.bin, or shards named
    by an index json."""
    for index, single in (('model.safetensors.index.json', 'model.safetensors'),
                          ('pytorch_model.bin.index.json', 'pytorch_model.bin')):
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                files = sorted(set(json.load(f)['weight_map'].values()))
            break
        if os.path.exists(os.path.join(path, single)):
            files = [single]
            break
    else:
        raise FileNotFoundError(f"{path} holds no model.safetensors, pytorch_model.bin or their .index.json "
                                f"(files: {sorted(os.listdir(path))})")
    import pickle
    import zipfile
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        try:  # the one place an HF weights file is read: a cut, damaged or missing file is one line naming it
            if name.endswith('.safetensors'):
                tensors.update(load_file(file))
            else:
                tensors.update(torch.load(file, map_location='cpu', weights_only=True))
        except FileNotFoundError:
            raise FileNotFoundError(f"{file} not found (its index names it): copy the whole model folder") from None
        except (SafetensorError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError,
                KeyError, IndexError, OSError) as e:
            first_line = (str(e).strip().splitlines() or [''])[0][:200]
            raise ValueError(f"{file} cannot be read (cut short or damaged? {type(e).__name__}: {first_line}): "
                             f"copy or export the model again") from None
    return tensors


def load_hf(path, device='cpu', dtype=None, tokenizer=True):
    """A local Hugging Face Llama folder -> (mirim Llama in eval mode, mirim Tokenizer). dtype None
    loads float32 (what training wants). The tokenizer comes from its SentencePiece tokenizer.model, or
    else its tokenizer.json (same ids); tokenizer=False skips it (-> (model, None))."""
    config_path = os.path.join(path, 'config.json')
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: load_hf reads a local Hugging Face model folder")
    try:
        with open(config_path, encoding='utf-8') as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    config = config_from_hf(hf, config_path)
    tensors = read_hf_tensors(path)
    if hf.get('model_type') == 'gemma':
        if not config.tie_embeddings:
            raise ValueError(f"{path}: an untied Gemma is not one mirim can compute (its head is the embedding)")
        tensors = from_gemma_tensors(tensors, config.n_embd)
    model = Llama(config)
    model.load_state_dict(from_hf_state_dict(tensors, config, dtype or torch.float32))
    model.to(device=device, dtype=dtype or torch.float32).eval()
    if not tokenizer:
        return model, None
    tok = read_hf_tokenizer(path)
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"{path}'s tokenizer has {tok.vocab_size} ids but the model only {config.vocab_size} embeddings")
    return model, tok


def read_hf_tokenizer(path):
    """The tokenizer of a Hugging Face folder as a mirim Tokenizer: its SentencePiece tokenizer.model
    (with the tokens transformers adds after it), else its tokenizer.json (tokenizer.load_hf_folder)."""
    from mirim.tokenizer import load_hf_folder
    try:
        return load_hf_folder(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}. Load the weights only with load_hf(path, tokenizer=False)") from None
