"""The model a training run starts from (scratch, resume or fine-tune) and the checks that its tokenizer
is the data's, with messages that say how to make them agree."""
import os
from dataclasses import asdict, fields

from mirim.checkpoint import load_checkpoint, model_config, model_from_checkpoint, resolve
from mirim.tokenizer import TOKENIZER_FILES


SHAPE_KEYS = ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'ffn_hidden', 'activation', 'rope_theta', 'norm_eps',
              'tie_embeddings')


def requested_model_config(cfg, meta):
    """The model a scratch run builds from a training config: the preset, then the shape keys set in
    the config, with the data's vocab size (unless vocab_size is set) and special token ids."""
    from model import PRESETS, LlamaConfig, depth_shape
    if cfg['model'] == 'auto':  # the depth dial: the shape follows from cfg['depth']
        shape = {**asdict(LlamaConfig()), **depth_shape(cfg.get('depth'))}
    elif cfg['model'] not in PRESETS:
        raise ValueError(f"model={cfg['model']!r} is not a preset; choose one of {', '.join(sorted(PRESETS))} "
                         f"or 'auto' (with depth)")
    else:
        shape = {**asdict(LlamaConfig()), **PRESETS[cfg['model']]}
    shape.update({k: cfg[k] for k in SHAPE_KEYS + ('block_size',) if cfg[k] is not None})
    if cfg['vocab_size'] and meta.get('vocab_size') and cfg['vocab_size'] < meta['vocab_size']:
        raise ValueError(f"vocab_size={cfg['vocab_size']} is smaller than the data's vocab of {meta['vocab_size']} "
                         f"tokens (leave vocab_size unset to use the data's)")
    shape['vocab_size'] = cfg['vocab_size'] or meta['vocab_size']
    shape['dropout'] = cfg['dropout']
    for key in ('bos_id', 'eos_id', 'pad_id'):
        if key in meta:
            shape[key] = meta[key]
    try:
        return LlamaConfig(**shape)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model shape: {e}") from None


def differences(want, have, keys):
    return [f"{k}={have.get(k)!r} (this config: {want.get(k)!r})" for k in keys if want.get(k) != have.get(k)]


def tokenizer_spec_hint(description, data_dir=None):
    """What to pass as data/prepare.py --tokenizer to get this tokenizer again, and its kind in words:
    a file in the model's data folder (when the checkpoint's config names it), a tiktoken name, 'bytes'."""
    kind = description.get('kind')
    words = {'sentencepiece': 'a SentencePiece tokenizer.model', 'tokenizers': 'a tokenizer.json',
             'tiktoken': f"tiktoken {description.get('name') or 'ranks'}", 'bytes': 'raw bytes'}.get(kind, kind)
    words += f" of {description['vocab_size']:,} pieces" if description.get('vocab_size') else ''
    if kind == 'bytes':
        return words, 'bytes'
    if kind == 'tiktoken' and description.get('name'):
        return words, f"tiktoken:{description['name']}"
    file = TOKENIZER_FILES[kind][1] if kind in TOKENIZER_FILES else 'tokenizer file'
    spec = os.path.join(data_dir, file) if data_dir else f"<the model's data dir>/{file}"
    return words, f"tiktoken:{spec}" if kind == 'tiktoken' else spec


def check_tokenizer(checkpoint, tokenizer, data_dir, path):
    """A model trained on one tokenizer's ids must not go on with another's."""
    from mirim.tokenizer import load_tokenizer, same_tokenizer
    if 'tokenizer' in checkpoint and not same_tokenizer(load_tokenizer(checkpoint['tokenizer']), tokenizer):
        model_data = (checkpoint.get('config') or {}).get('data_dir')
        if model_data and os.path.abspath(model_data) == os.path.abspath(data_dir):
            model_data = None  # prepared again since: its tokenizer file is now the other one
        words, spec = tokenizer_spec_hint(checkpoint['tokenizer'], model_data)
        raise ValueError(f"{data_dir} was tokenized with another tokenizer ({tokenizer.kind}, "
                         f"{tokenizer.vocab_size:,} pieces) than the model in {path}, whose tokenizer is {words}: "
                         f"prepare the data with the model's tokenizer (data/prepare.py --tokenizer {spec})")


def check_hf_tokenizer(folder, tokenizer, data_dir):
    """A Hugging Face folder's model must go on with its own tokenizer's ids (when the folder has one)."""
    from mirim.hf import read_hf_tokenizer
    from mirim.tokenizer import same_tokenizer
    try:
        theirs = read_hf_tokenizer(folder)
    except FileNotFoundError:  # weights only: nothing to compare with
        return
    if not same_tokenizer(theirs, tokenizer):
        raise ValueError(f"{data_dir} was tokenized with another tokenizer than the model in {folder}: prepare the "
                         f"data with the model's tokenizer (data/prepare.py --tokenizer {folder})")


def build_model(cfg, meta, tokenizer, say=print):
    """The model a training run starts from -> (model on the CPU in float32, checkpoint dict when
    resuming else None). cfg['init_from'] is 'scratch', 'resume' (out_dir/ckpt.pt: same shape, same
    tokenizer) or a mirim checkpoint / HF folder to fine-tune (its shape; weights only). tokenizer is
    the data's. A config without a 'model' key (dpo.py's) describes no shape: it cannot start from scratch,
    and it resumes or fine-tunes whatever shape the checkpoint holds. ValueError / FileNotFoundError say
    what does not fit."""
    from model import Llama, LlamaConfig
    init_from = cfg['init_from']
    if init_from == 'scratch':
        return Llama(requested_model_config(cfg, meta), seed=cfg['seed'], zero_residual=cfg.get('zero_residual', False)), None

    if init_from == 'resume':
        parallel = cfg.get('parallel', 'ddp')
        name, other = ('ckpt.dcp', 'ckpt.pt') if parallel == 'fsdp' else ('ckpt.pt', 'ckpt.dcp')
        path = os.path.join(cfg['out_dir'], name)
        if not os.path.exists(path) and os.path.exists(os.path.join(cfg['out_dir'], other)):
            raise FileNotFoundError(f"{cfg['out_dir']} holds {other}, a checkpoint of a run with parallel="
                                    f"{'ddp' if parallel == 'fsdp' else 'fsdp'!r}: resume it with --parallel="
                                    f"{'ddp' if parallel == 'fsdp' else 'fsdp'}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"init_from='resume' but {path} does not exist; start with --init_from=scratch")
        checkpoint = load_checkpoint(path)
        keys = [f.name for f in fields(LlamaConfig) if f.name != 'dropout']
        diff = differences(asdict(requested_model_config(cfg, meta)), model_config(checkpoint, path), keys) \
            if 'model' in cfg else None
        if diff:
            raise ValueError(f"{path} holds a model of a different shape: {'; '.join(diff)}. Resume with the config "
                             f"that started the run, or train this one in another out_dir")
        check_tokenizer(checkpoint, tokenizer, cfg['data_dir'], path)
        return model_from_checkpoint(checkpoint, cfg['dropout'], path), checkpoint

    # fine-tuning: weights from a mirim checkpoint or a Hugging Face folder, the rest starts fresh
    if cfg.get('zero_residual'):
        raise ValueError(f"zero_residual=True zeroes a scratch model's residual projections, but init_from={init_from} "
                         f"gives every weight: leave it unset to fine-tune")
    kind, where = resolve(init_from)
    if kind == 'hf':
        from mirim.hf import load_hf
        model, _ = load_hf(where, tokenizer=False)
        check_hf_tokenizer(where, tokenizer, cfg['data_dir'])
        source, state = asdict(model.config), model.state_dict()
    else:
        checkpoint = load_checkpoint(where)
        check_tokenizer(checkpoint, tokenizer, cfg['data_dir'], init_from)
        source = model_config(checkpoint, where)
    asked = {k: cfg[k] for k in SHAPE_KEYS + ('vocab_size',) if cfg.get(k) is not None}
    diff = differences(asked, source, asked)
    if diff:
        raise ValueError(f"{init_from} holds a model with {'; '.join(diff)}; fine-tuning keeps the model's shape, "
                         f"so leave those keys unset")
    say(f"fine-tuning the weights of {init_from} (its shape" + ("; the 'model' preset is not used" if 'model' in cfg
                                                                else "") + "; optimizer fresh)")
    if kind == 'hf':
        model = Llama(LlamaConfig.from_dict({**source, 'dropout': cfg['dropout']}))
        model.load_state_dict(state)
    else:  # the one way a mirim checkpoint becomes a model: every key and tensor checked (mirim/checkpoint.py)
        model = model_from_checkpoint(checkpoint, cfg['dropout'], where)
    return model, None
