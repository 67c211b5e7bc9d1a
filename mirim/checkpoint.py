"""
Reading checkpoints: what a path names (a training out_dir, a checkpoint file, a Hugging Face folder)
and loading a model from any of them.

A checkpoint is a torch.save'd dict of plain tensors, numbers and strings (loaded with
weights_only=True, so loading never runs code): 'model' (state dict), 'model_config' (LlamaConfig
fields), 'tokenizer' (its whole description), and from a training run also 'config', 'step',
'tokens_seen', 'optimizer', 'scaler', 'sampler', 'rng', 'best_val_loss', 'val_loss', 'val_bpb',
'data_dir' (mirim/run.py writes them).
"""
import json
import os
from dataclasses import asdict

MODEL_KEYS = ('model', 'model_config', 'tokenizer')  # what every mirim checkpoint holds


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
    if is_hf_folder(path):
        return 'hf', path
    found = sorted(f for f in os.listdir(path) if f.endswith('.pt'))
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
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, KeyError, IndexError,
            OSError) as e:  # what torch.load raises for files that are not checkpoints, truncated ones among them
        first_line = (str(e).strip().splitlines() or [''])[0].split('. ')[0][:200]
        raise CheckpointError(f"{path} is not a mirim checkpoint that can be loaded ({type(e).__name__}: "
                              f"{first_line})") from None
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


def model_from_checkpoint(checkpoint, dropout=None):
    """The Llama a checkpoint dict holds, in float32 on the CPU."""
    from model import Llama, LlamaConfig
    config = dict(checkpoint['model_config'])
    if dropout is not None:
        config['dropout'] = dropout
    model = Llama(LlamaConfig.from_dict(config))
    model.load_state_dict(clean_state_dict(checkpoint['model']))
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
        model = model_from_checkpoint(ckpt).to(device=device, dtype=dtype).eval()
        tokenizer = load_tokenizer(ckpt['tokenizer'])
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # a diverged run's weights: samples, scores and exports of them would all be NaN
        raise CheckpointError(f"{where} holds non-finite weights (NaN or inf in {len(bad)} tensors, e.g. {bad[0]}): "
                              f"the run that saved it diverged; use an earlier checkpoint")
    return model, tokenizer, ckpt




