"""
Reading checkpoints: what a path names (a training out_dir, a checkpoint file, a Hugging Face folder)
and loading a model from any of them.

A checkpoint is a torch.save'd dict of plain tensors, numbers and strings (loaded with
weights_only=True, so loading never runs code): 'model' (state dict), 'model_config' (LlamaConfig
fields), 'tokenizer' (its whole description), and from a training run also 'config', 'step',
'tokens_seen', 'optimizer', 'scaler', 'sampler', 'rng', 'best_val_loss', 'val_loss', 'val_bpb',
'data_dir' (mirim/run.py writes them).

A checkpoint loads as the model it was saved from, or not at all (CheckpointError, one line naming the key
or the tensor): its model_config must give every field of LlamaConfig that decides the model's shape or
what it computes (MODEL_CONFIG_KEYS; only dropout, a training setting, may be left out), and its weights
must be exactly the tensors, of exactly the shapes, that model_config builds. Nothing is filled in from
LlamaConfig's defaults: a config without tie_embeddings would load tied, one without activation as SwiGLU.
"""
import json
import os
from dataclasses import asdict

MODEL_KEYS = ('model', 'model_config', 'tokenizer')  # what every mirim checkpoint holds
# the format of what a checkpoint holds; 'format_version' in a checkpoint (none: 1) says which it was written in, and
# a checkpoint of a later format (a newer mirim) is refused rather than read as what this mirim knows
FORMAT_VERSION = 1
# the model_config keys a checkpoint must hold: the shape (vocab_size ... ffn_hidden), what the model computes
# (activation, rope_theta, norm_eps, tie_embeddings) and the special ids that generation and export.py use;
# every LlamaConfig field but dropout (training only: 0 at inference, and a run sets its own)
MODEL_CONFIG_KEYS = ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'ffn_hidden',
                     'activation', 'rope_theta', 'norm_eps', 'tie_embeddings', 'bos_id', 'eos_id', 'pad_id')


class CheckpointError(ValueError):
    """A path that does not hold what it should; the message says what it holds instead."""


# -----------------------------------------------------------------------------
# what a path is

def is_hf_folder(path):
    """A Hugging Face model folder: its config.json describes a model (model_type). train.py also
    writes a config.json into its out_dir, but that one holds training settings."""
    try:
        with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and 'model_type' in config


def resolve(path, checkpoint='ckpt.pt'):
    """-> ('mirim', checkpoint file) or ('hf', folder) for a checkpoint file, a training out_dir
    (its `checkpoint` file) or a Hugging Face model folder; FileNotFoundError saying what is there
    for anything else."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: give a training out_dir, a checkpoint file or a "
                                f"Hugging Face model folder")
    if os.path.isfile(path):
        return 'mirim', path
    file = os.path.join(path, checkpoint)
    if os.path.isfile(file):
        return 'mirim', file
    # a run with parallel='fsdp' saves ckpt.dcp / best.dcp (sharded folders), and a path may name one itself
    sharded = file.removesuffix('.pt') + '.dcp'
    if os.path.isdir(sharded):
        return 'mirim', sharded
    if os.path.isfile(os.path.join(path, '.metadata')):
        return 'mirim', path
    if is_hf_folder(path):
        return 'hf', path
    found = sorted(f for f in os.listdir(path) if f.endswith(('.pt', '.dcp')))
    if found:
        why = (" (best.pt is written at the first evaluation that improves the validation loss)"
               if checkpoint == 'best.pt' else "")
        raise FileNotFoundError(f"{path} has no {checkpoint}{why}; it holds {', '.join(found)}: pick one with "
                                f"--checkpoint=NAME")
    raise FileNotFoundError(f"no checkpoint {file}, and {path} is not a Hugging Face model folder either (no "
                            f"config.json with a model_type); train one first: python train.py config/...")


# -----------------------------------------------------------------------------
# loading

def load_checkpoint(path, keys=MODEL_KEYS):
    """torch.load a checkpoint file (weights only) -> dict; CheckpointError when the file is not a
    checkpoint or lacks one of keys."""
    import pickle
    import zipfile
    import torch
    try:
        if os.path.isdir(path):  # a sharded checkpoint (parallel='fsdp'): its weights gathered here
            from mirim.fsdp import read_sharded
            checkpoint = read_sharded(path)
        else:
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, KeyError, IndexError,
            OSError) as e:  # what torch.load raises for files that are not checkpoints, truncated ones among them
        first_line = (str(e).strip().splitlines() or [''])[0].split('. ')[0][:200]
        raise CheckpointError(f"{path} is not a mirim checkpoint that can be loaded ({type(e).__name__}: "
                              f"{first_line})") from None
    version = checkpoint.get('format_version', 1) if isinstance(checkpoint, dict) else 1
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path} is a checkpoint of format_version {version!r}, but this mirim reads format "
                              f"{FORMAT_VERSION} and earlier: it was written by a newer mirim (update this one: git "
                              f"pull), or edited by hand")
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in keys):
        have = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not a mirim checkpoint: it lacks "
                              f"{[k for k in keys if not isinstance(checkpoint, dict) or k not in checkpoint]} "
                              f"(it holds {have})")
    return checkpoint


def clean_state_dict(state):
    """Drop the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    clean = {}
    for name, value in state.items():
        while name.startswith(('_orig_mod.', 'module.')):
            name = name.split('.', 1)[1]
        clean[name] = value
    return clean


def model_config(checkpoint, where='the checkpoint'):
    """The checkpoint's model_config, checked: a dict with every MODEL_CONFIG_KEYS key, of a type LlamaConfig can
    take as it is (tie_embeddings a bool, not the string 'false'), dropout 0.0 when absent. CheckpointError
    naming the key otherwise."""
    config = checkpoint.get('model_config')
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: model_config is a {type(config).__name__}, not the dict of LlamaConfig "
                              f"fields that mirim writes")
    missing = [k for k in MODEL_CONFIG_KEYS if k not in config]
    if missing:
        raise CheckpointError(
            f"{where}: model_config lacks {', '.join(missing)}, which decide{'s' if len(missing) == 1 else ''} what "
            f"the model computes; mirim does not guess {'it' if len(missing) == 1 else 'them'} (the default could load "
            f"another model): add {'it' if len(missing) == 1 else 'them'} to the checkpoint's model_config with the "
            f"value{'s' if len(missing) > 1 else ''} the model was trained with")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    checks = {'tie_embeddings': (lambda v: isinstance(v, bool) or v in (0, 1) and isinstance(v, int), 'true or false'),
              'activation': (lambda v: isinstance(v, str), 'a string'),
              'rope_theta': (number, 'a number'), 'norm_eps': (number, 'a number'), 'dropout': (number, 'a number')}
    checks.update({k: (lambda v: isinstance(v, int) and not isinstance(v, bool), 'an integer')
                   for k in MODEL_CONFIG_KEYS[:7]})
    checks.update({k: (lambda v: v is None or isinstance(v, int) and not isinstance(v, bool), 'a token id or None')
                   for k in ('bos_id', 'eos_id', 'pad_id')})
    for key, (ok, what) in checks.items():
        if key in config and not ok(config[key]):
            raise CheckpointError(f"{where}: model_config {key}={config[key]!r} is not {what}")
    return {**config, 'dropout': config.get('dropout', 0.0)}


def check_weights(state, model, where='the checkpoint'):
    """The state dict must hold exactly the model's tensors in the model's shapes (a tied model's output.weight
    may be left out: it is the embedding); CheckpointError naming the first tensor that does not fit."""
    import torch
    config = model.config
    shape = "model_config (" + ', '.join(f"{k}={getattr(config, k)}" for k in (
        'n_layer', 'n_embd', 'n_head', 'n_kv_head', 'ffn_hidden', 'vocab_size', 'tie_embeddings')) + ")"
    expected = model.state_dict()
    if config.tie_embeddings and 'output.weight' not in state:
        expected = {k: v for k, v in expected.items() if k != 'output.weight'}
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{where}: the weight {not_tensors[0]} is a {type(state[not_tensors[0]]).__name__}, "
                              f"not a tensor")
    more = lambda names: f" (and {len(names) - 1} more)" if len(names) > 1 else ""  # noqa: E731
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{where}: the weights lack {missing[0]}{more(missing)}, which its {shape} calls for: "
                              f"the weights and model_config are of different models")
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(f"{where}: the weights hold {extra[0]}{more(extra)}, which its {shape} has no place "
                              f"for: the weights and model_config are of different models")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: the weight {name} has shape {tuple(state[name].shape)}, but its {shape} "
                                  f"makes it {tuple(tensor.shape)}")
    # equal_nan: a diverged run's tied weights are NaN in both, the same tensor (its own error comes later)
    if config.tie_embeddings and 'output.weight' in state and not torch.allclose(
            state['output.weight'], state['tok_embeddings.weight'], rtol=0, atol=0, equal_nan=True):
        raise CheckpointError(f"{where}: model_config says tie_embeddings=True, but output.weight and "
                              f"tok_embeddings.weight differ: the weights are of an untied model")


def model_from_checkpoint(checkpoint, dropout=None, where='the checkpoint'):
    """The Llama a checkpoint dict holds, in float32 on the CPU; CheckpointError (one line, naming the key or the
    tensor; `where` names the file) when its model_config lacks a key that decides the model or its weights do
    not fit it."""
    from model import Llama, LlamaConfig
    config = model_config(checkpoint, where)
    if dropout is not None:
        config['dropout'] = dropout
    try:
        model = Llama(LlamaConfig.from_dict(config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: model_config: {e}") from None
    if not isinstance(checkpoint.get('model'), dict):
        raise CheckpointError(f"{where}: 'model' is a {type(checkpoint.get('model')).__name__}, not a state dict")
    state = clean_state_dict(checkpoint['model'])
    check_weights(state, model, where)
    model.load_state_dict(state, strict=not model.config.tie_embeddings or 'output.weight' in state)
    return model


def load_model(path, device='cpu', dtype=None, checkpoint='ckpt.pt'):
    """(model in eval mode, tokenizer, checkpoint dict) from a mirim checkpoint file, a training
    out_dir (its `checkpoint` file) or a Hugging Face Llama folder. The tokenizer comes from the
    checkpoint alone; an HF folder's dict holds just model_config and hf_dir."""
    import torch
    kind, where = resolve(path, checkpoint)
    if kind == 'hf':
        from mirim.hf import load_hf
        model, tokenizer = load_hf(where, device, dtype)
        ckpt = {'model_config': asdict(model.config), 'hf_dir': where}
    else:
        from mirim.tokenizer import load_tokenizer
        ckpt = load_checkpoint(where)
        model = model_from_checkpoint(ckpt, where=where).to(device=device, dtype=dtype).eval()
        tokenizer = load_tokenizer(ckpt['tokenizer'])
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # a diverged run's weights: samples, scores and exports of them would all be NaN
        raise CheckpointError(f"{where} holds non-finite weights (NaN or inf in {len(bad)} tensors, e.g. {bad[0]}): "
                              f"the run that saved it diverged; use an earlier checkpoint")
    return model, tokenizer, ckpt




