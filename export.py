"""
Move models between mirim and Hugging Face transformers.

Export a mirim checkpoint as a folder that transformers loads with no custom code:

    python export.py --out_dir=out/biblia-pt --dest=hf/biblia-pt [--dtype=bfloat16] [--checkpoint=best.pt]

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained('hf/biblia-pt')   # LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained('hf/biblia-pt')

The folder holds config.json, model.safetensors, generation_config.json, the tokenizer
(tokenizer.json + tokenizer_config.json + special_tokens_map.json, and tokenizer.model for
SentencePiece) and a README.md model card filled from the checkpoint. A --dest that already holds an
export is replaced only with --overwrite, and then wholly: the files of the old export that the new one
does not write go too (a tokenizer.model of another model, eval.py's results of the old one); other
files there stay. A training out_dir or a data set folder is never a --dest.

The weights and config.json are mapped by mirim/hf.py (which also reads HF folders back into mirim:
mirim.hf.load_hf, or point sample.py / eval.py / train.py's init_from at the folder), the tokenizer files
by mirim/hf_tokenizer.py.

Tokenizers: a SentencePiece model becomes a tokenizer.json that reproduces SentencePiece's ids
(checked on sample texts at export time, and tokenizer.model is copied too); 'bytes' and tiktoken
tokenizers become byte-level BPE tokenizer.json files with the same ids; a tokenizer that came as a
tokenizer.json (an imported model's, or one trained with --model_type bytelevel) is copied unchanged.
"""
import json
import os
import sys

import torch

from mirim.atomic import claim_folder, OTHER_RESULTS, write_atomic, write_json
from mirim.chat import stop_id
from mirim.checkpoint import load_model, resolve
from mirim.common import DTYPES
from mirim.hf import HF_ACTIVATION, as_gemma, hf_config, to_gemma_tensors, to_hf_state_dict
from mirim.configurator import configure
from mirim.gguf_export import export_gguf
from mirim.hf_tokenizer import write_tokenizer
from mirim.model_card import CARD_FILES, write_card

# the files of an export (tokenizer.model only for SentencePiece, generation_config.json not for a
# classifier), and the results eval.py writes beside a model: an export with overwrite replaces or removes
# them all, so that nothing of the model it replaces stays (a tokenizer.model beside a bytes tokenizer.json)
HF_FILES = ('config.json', 'model.safetensors', 'generation_config.json', 'README.md', 'tokenizer.json',
            'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model') + CARD_FILES


def hf_file(name):
    return name in HF_FILES or (name.startswith('eval_') and name.endswith('.json'))


def export(source, dest, dtype='float32', checkpoint='ckpt.pt', license='other', check_tokenizer=True,
           overwrite=False):
    """Write the Hugging Face folder dest from a mirim out_dir (its `checkpoint` file) or checkpoint
    file: a LlamaForCausalLM, or for a classify.py classifier.pt a LlamaForSequenceClassification.
    A dest that holds an export already is refused unless overwrite, one that holds a training run or a
    data set always (mirim/atomic.claim_folder); other files in it are left as they are."""
    from safetensors.torch import save
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    old = claim_folder(dest, hf_file, overwrite, 'an export', '--dest', refuse=OTHER_RESULTS)  # before the load
    model, tok, ckpt = load_model(source, checkpoint=checkpoint)
    classifier = 'head' in ckpt  # never export a classifier as a language model without its head
    if classifier:
        check_classifier(ckpt, tok)
    config = model.config
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only {config.vocab_size}")
    os.makedirs(dest, exist_ok=True)
    stale = [f for f in os.listdir(dest) if f.startswith('pytorch_model') or
             (f.startswith('model') and f.endswith(('.safetensors', '.index.json')) and f != 'model.safetensors')]
    if stale:
        raise ValueError(f"{dest} already holds weight files that transformers would read too: {stale}; "
                         f"remove them or export to an empty folder")
    for name in sorted(old, key=lambda name: name != 'config.json'):  # from then on no model to load
        os.remove(os.path.join(dest, name))
    write_tokenizer(tok, dest, config.block_size, check=check_tokenizer, append_eos=classifier)
    gemma = as_gemma(config) and not classifier
    hf = hf_config(config, dtype, gemma=gemma)
    tensors = to_hf_state_dict(model.state_dict(), config, torch.float32)
    if gemma:  # GeGLU: an architecture vLLM and llama.cpp's converter compute as transformers does
        tensors = to_gemma_tensors(tensors, config)
        if config.activation == 'gelu':
            print("note: exact-erf GELU is written as Gemma with hidden_act=gelu_python, which transformers computes "
                  "exactly; vLLM refuses it and llama.cpp's converter computes the tanh form (export.py --format=gguf "
                  "says how far apart)", file=sys.stderr)
    elif config.activation != 'silu' and not classifier:
        print(f"note: an untied GeGLU model is written as LlamaForCausalLM with hidden_act="
              f"{HF_ACTIVATION[config.activation]}: transformers computes it right, vLLM and llama.cpp's converter "
              f"do not (they take every Llama for SwiGLU); export.py --format=gguf writes a file llama.cpp runs right",
              file=sys.stderr)
    tensors = {name: t.to(DTYPES[dtype]).contiguous() for name, t in tensors.items()}
    if classifier:
        # HF's score layer reads the last token that is not padding: the <eos> classify.py reads
        labels = [str(label) for label in ckpt['labels']]
        hf.update(architectures=['LlamaForSequenceClassification'], num_labels=len(labels),
                  id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
                  pad_token_id=tok.pad_id, problem_type='single_label_classification')
        tensors.pop('lm_head.weight', None)
        tensors['score.weight'] = ckpt['head']['weight'].to('cpu', DTYPES[dtype]).contiguous()
    else:
        write_json(os.path.join(dest, 'generation_config.json'),
                   {'bos_token_id': config.bos_id, 'eos_token_id': end_ids(config, tok), 'pad_token_id': config.pad_id})
    write_json(os.path.join(dest, 'config.json'), hf)
    write_atomic(os.path.join(dest, 'model.safetensors'), save(tensors, metadata={'format': 'pt'}))
    write_card(dest, model, tok, ckpt, resolve(source, checkpoint)[1] if 'hf_dir' not in ckpt else None, dtype, license)
    return dest


def end_ids(config, tok):
    """generation_config.json's eos_token_id: <eos>, and for a chat model every token that ends a turn
    (ChatML's <|im_end|>), so that generate() stops where sample.py and serve.py do."""
    ids = [config.eos_id]
    if tok.chat_template:
        ids.append(stop_id(tok.chat_template, tok))
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids[0] if len(ids) == 1 else ids


def check_classifier(ckpt, tok):
    """A classifier exports only when transformers computes it as classify.py does."""
    bias = ckpt['head'].get('bias')
    if bias is not None and bias.abs().max() > 0:
        raise ValueError("this classifier's head has a bias, which transformers' LlamaForSequenceClassification "
                         "has no place for (classify.py's heads have none since); train it again with classify.py")
    if tok.pad_id is None or tok.pad_id in (tok.eos_id, tok.bos_id):
        raise ValueError("transformers finds the token to classify as the last one that is not padding, so the "
                         "tokenizer needs a pad token of its own; this one has none")


DEFAULTS = dict(
    out_dir='out',            # a training out_dir, or a checkpoint file
    checkpoint='ckpt.pt',     # file inside out_dir: ckpt.pt (latest) or best.pt (best validation loss)
    dest='',                  # the Hugging Face folder to write, e.g. hf/biblia-pt
    dtype='float32',          # weights in model.safetensors: float32, bfloat16 or float16
    license='other',          # the model card's license field (a Hub license id, e.g. apache-2.0)
    check_tokenizer=True,     # verify tokenizer.json gives the mirim tokenizer's ids on sample texts
    overwrite=False,          # replace the export already in --dest (refused otherwise; a run or data set never)
    format='hf',              # hf: a transformers folder; gguf: GGUF files for llama.cpp / ollama (gguf_export.py)
    gguf_type='f16',          # with format=gguf: f32, f16, q8_0, q4_0, or several, comma-separated
)


def main(argv):
    config = configure(DEFAULTS, argv, help_source=__file__)  # --help reads the comments in DEFAULTS
    if config['format'] == 'gguf':
        if not config['dest']:
            raise ValueError("say where to write the GGUF files: --dest=gguf/NAME")
        export_gguf(config['out_dir'], config['dest'], config['gguf_type'].split(','), config['checkpoint'],
                    overwrite=config['overwrite'])
        return
    if config['format'] != 'hf':
        raise ValueError(f"format={config['format']!r}: choose hf or gguf")
    if not config['dest']:
        raise ValueError("say where to write the Hugging Face folder: --dest=hf/NAME")
    dest = export(config['out_dir'], config['dest'], config['dtype'], config['checkpoint'], config['license'],
                  config['check_tokenizer'], config['overwrite'])
    with open(os.path.join(dest, 'config.json'), encoding='utf-8') as f:
        architecture = json.load(f)['architectures'][0]
    auto = 'AutoModelForSequenceClassification' if architecture.endswith('SequenceClassification') \
        else 'AutoModelForCausalLM'
    print(f"wrote {dest} ({architecture}): load it with transformers.{auto}.from_pretrained({dest!r})")


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (OSError, ValueError) as e:  # a --dest that cannot be written among them
        sys.exit(f"export.py: error: {e}")
