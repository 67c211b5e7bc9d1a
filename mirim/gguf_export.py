"""
GGUF export: a mirim model as one file that llama.cpp (and ollama, and llama-cpp-python) runs.

    python export.py --out_dir=out/biblia-pt --format=gguf --dest=gguf/biblia-pt --gguf_type=f16,q8_0,q4_0
    llama-cli -m gguf/biblia-pt/biblia-pt-q8_0.gguf -p "No princípio" -n 50
    ollama create biblia-pt -f gguf/biblia-pt/Modelfile && ollama run biblia-pt

Written with the `gguf` package (llama.cpp's own gguf-py); the weights are quantized in Python:
f32, f16, q8_0 and q4_0 (gguf-py cannot quantize the k-quants such as q4_K; llama.cpp's
llama-quantize can, from the f16 file). In the q4_0 file the embedding and a separate head stay q8_0
(llama-quantize also keeps the head at more bits), the norms are always f32.

How a mirim model maps onto llama.cpp's graphs (read from llama.cpp's src/models/*.cpp):
- SwiGLU models become arch 'llama'. Its graph rotates adjacent pairs of each head (GPT-J style)
  where mirim rotates halves (rotate-half): the rows of wq and wk are reordered per head so that
  both compute the same thing (as llama.cpp's convert_hf_to_gguf.py does).
- GeGLU models become arch 'gemma', llama.cpp's Llama-like graph with a GELU-gated MLP and
  rotate-half RoPE. It multiplies the input embeddings by sqrt(n_embd) and always uses the embedding
  as the head: token_embd holds embedding / sqrt(n_embd), and the final norm's weight is multiplied
  by sqrt(n_embd) to undo it in the head. (Gemma's "1 + w" norms are added up by the converter, not
  at run time: llama.cpp multiplies by the stored weight, so mirim's weights go in as they are.)
  Its attention scale is 1/sqrt(head_size) like mirim's. An untied GeGLU model is refused: no
  llama.cpp decoder graph has a GELU-gated MLP, plain attention and a separate head.
  llama.cpp's GELU is the tanh form, read from an fp16 table on CPU: 'gelu_tanh' matches up to that
  table; exact-erf 'gelu' is approximated (|erf - tanh form| <= 5e-4 per activation; said when written).
- An MLP width that is not a multiple of the 32-wide blocks (the demo's 688) is padded with zero
  rows of gate/up and zero columns of down: act(0) * 0 = 0, so the padding computes exactly nothing.
  A matrix whose input width n_embd is not a multiple of 32 stays f16 (printed).

Vocabularies:
- SentencePiece: llama.cpp's 'llama' (SPM) tokenizer with the pieces, scores and types; chat tokens
  (<|im_start|>, <|im_end|>, any user-defined piece) are CONTROL tokens. SentencePiece puts its '▁'
  before the text once; llama.cpp puts it before every stretch of text that follows a special token.
  So a model without a chat template keeps add_space_prefix (plain text tokenizes as in mirim), and
  a chat model turns it off and its chat template writes the one leading space itself (chat prompts
  tokenize as mirim's chat_ids). No setting serves both: with the prefix on, every turn's text would
  get a '▁' after its chat token. So a chat model has one supported path, said in the README and the
  Modelfile: its own template (llama.cpp with --jinja, llama-cpp-python's chat completion, ollama);
  llama.cpp's built-in ChatML (no --jinja) leaves out the '▁' after <s>, and plain text needs a space
  written first (tests/test_gguf.py checks all three). Unigram models are tokenized by llama.cpp with the BPE-style SPM
  algorithm, which is not SentencePiece's Viterbi search: they are refused.
- bytes and tiktoken: llama.cpp's byte-level 'gpt2' BPE with the merges export.py writes for
  tokenizer.json, and a pre-tokenizer llama.cpp knows: GPT-2's pattern as 'gpt-2', cl100k's as
  'llama-bpe' (Llama 3's form of it). Other split patterns are refused.
- tokenizer.json: the same, when it is a byte-level BPE split by one of those patterns (GPT-2's
  kind; cl100k-style); others, mirim's own byte-level training among them (its pattern keeps
  combining marks with their letters, which no llama.cpp pre-tokenizer does), are refused.
"""
import json
import math
import os
import shutil

import numpy as np
import torch

from mirim.atomic import claim_folder, OTHER_RESULTS, write_atomic
from mirim.checkpoint import load_model
from mirim.chat import EOS, chat_template_go, chat_template_jinja, get_template
from mirim.hf_tokenizer import byte_level_backend
from mirim.sampling import KNOBS

GGUF_TYPES = ('f32', 'f16', 'q8_0', 'q4_0')
BLOCK = 32  # q8_0 and q4_0 quantize rows in blocks of 32 values


def gguf_arch(config):
    """llama.cpp's architecture for this model, or ValueError when none computes it."""
    if config.activation == 'silu':
        return 'llama'
    if not config.tie_embeddings:
        raise ValueError(f"cannot write a GGUF of an untied GeGLU model ({config.activation}): llama.cpp's "
                         f"'llama' graph is SwiGLU only, and its GELU-gated graph ('gemma') always uses the "
                         f"embedding as the head. Export it with --format=hf, or train it tied")
    return 'gemma'


def permute_rope(w, n_head):
    """Reorder the rows of wq / wk per head from rotate-half pairs (i, i + hs/2) to adjacent pairs
    (2i, 2i + 1), the pairs llama.cpp's 'llama' graph rotates."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model, qtype, log=print):
    """[(GGUF tensor name, float32 tensor, GGML type name)] for this model written as qtype."""
    c, sd = model.config, {k: v.detach().to('cpu', torch.float32) for k, v in model.state_dict().items()}
    arch = gguf_arch(c)
    quantized = qtype in ('q8_0', 'q4_0')
    ffn = c.ffn_hidden
    pad = -ffn % BLOCK if quantized else 0
    if pad:
        log(f"the MLP is {ffn} wide, not a multiple of {qtype}'s {BLOCK}-wide blocks: padded to {ffn + pad} "
            f"with zero weights (exact: the padding adds nothing)")
    if quantized and c.n_embd % BLOCK:
        log(f"n_embd={c.n_embd} is not a multiple of {BLOCK}: the matrices that read it stay f16 in this {qtype} file")
    # the embedding and a separate head keep 8 bits in a 4-bit file (they are few and sensitive)
    edge = 'q8_0' if qtype == 'q4_0' else qtype

    embedding, final_norm = sd['tok_embeddings.weight'], sd['norm.weight']
    if arch == 'gemma':
        # gemma scales the embeddings by sqrt(n_embd) and reads the head from them: fold both away
        scale = math.sqrt(c.n_embd)
        embedding = (embedding.double() / np.float32(scale)).float()
        final_norm = (final_norm.double() * scale).float()
    out = [('token_embd.weight', embedding, edge), ('output_norm.weight', final_norm, 'f32')]
    if not c.tie_embeddings:
        out.append(('output.weight', sd['output.weight'], edge))
    q_rows, kv_rows = c.n_head * c.head_size, c.n_kv_head * c.head_size
    for i in range(c.n_layer):
        p, b = f'layers.{i}.', f'blk.{i}.'
        q, k, v = sd[p + 'attention.wqkv.weight'].split([q_rows, kv_rows, kv_rows])
        if arch == 'llama':
            q, k = permute_rope(q, c.n_head), permute_rope(k, c.n_kv_head)
        gate, up = sd[p + 'feed_forward.w13.weight'].split([ffn, ffn])
        down = sd[p + 'feed_forward.w2.weight']
        if pad:
            gate, up = (torch.cat([w, w.new_zeros(pad, c.n_embd)]) for w in (gate, up))
            down = torch.cat([down, down.new_zeros(c.n_embd, pad)], dim=1)
        out += [(b + 'attn_norm.weight', sd[p + 'attention_norm.weight'], 'f32'),
                (b + 'attn_q.weight', q, qtype), (b + 'attn_k.weight', k, qtype), (b + 'attn_v.weight', v, qtype),
                (b + 'attn_output.weight', sd[p + 'attention.wo.weight'], qtype),
                (b + 'ffn_norm.weight', sd[p + 'ffn_norm.weight'], 'f32'),
                (b + 'ffn_gate.weight', gate, qtype), (b + 'ffn_up.weight', up, qtype), (b + 'ffn_down.weight', down, qtype)]
    # a quantized type needs whole blocks along each row: otherwise f16
    return [(name, t, 'f16' if kind in ('q8_0', 'q4_0') and t.shape[-1] % BLOCK else kind) for name, t, kind in out]


def encode(tensor, kind):
    """(numpy data, raw GGML type or None) for GGUFWriter.add_tensor."""
    import gguf
    array = tensor.contiguous().numpy()
    if kind == 'f32':
        return array.astype(np.float32), None
    if kind == 'f16':
        return array.astype(np.float16), None
    qtype = {'q8_0': gguf.GGMLQuantizationType.Q8_0, 'q4_0': gguf.GGMLQuantizationType.Q4_0}[kind]
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


# -----------------------------------------------------------------------------
# vocabulary

def sentencepiece_vocab(tok):
    """(tokens, scores, types, add_space_prefix) of a SentencePiece tokenizer for llama.cpp's SPM."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto.FromString(tok.to_dict()['model_proto'])
    Piece, T = proto.SentencePiece, gguf.TokenType
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise ValueError("cannot write a GGUF of a SentencePiece unigram tokenizer: llama.cpp tokenizes SentencePiece "
                         "vocabularies with BPE merges by score, which differs from unigram's Viterbi search")
    kinds = {Piece.NORMAL: T.NORMAL, Piece.UNKNOWN: T.UNKNOWN, Piece.CONTROL: T.CONTROL,
             Piece.USER_DEFINED: T.CONTROL,  # chat tokens: special, matched in prompts, hidden in output
             Piece.UNUSED: T.UNUSED, Piece.BYTE: T.BYTE}
    tokens = [p.piece.encode('utf-8') for p in proto.pieces]
    return tokens, [p.score for p in proto.pieces], [kinds[p.type] for p in proto.pieces], \
        proto.normalizer_spec.add_dummy_prefix



def known_split_patterns():
    """Split patterns llama.cpp has a pre-tokenizer for -> its name: GPT-2's, and cl100k's (Llama 3's form)."""
    from tiktoken_ext.openai_public import r50k_pat_str
    from mirim.tokenizer import CL100K_PATTERN
    known = {r50k_pat_str: 'gpt-2', CL100K_PATTERN: 'llama-bpe'}
    try:
        from tiktoken_ext.openai_public import cl100k_base
        known[cl100k_base()['pat_str']] = 'llama-bpe'
    except Exception:  # its ranks file is not needed for the pattern, but older tiktoken may differ
        pass
    return known


def byte_level_pre(tok):
    """llama.cpp's pre-tokenizer name for a bytes / tiktoken tokenizer's split pattern."""
    if tok.kind == 'bytes':
        return 'default'  # every token is one byte: how the text is split changes nothing
    pattern = tok._enc._pat_str
    known = known_split_patterns()
    if pattern not in known:
        raise ValueError(f"cannot write a GGUF of this tiktoken tokenizer: llama.cpp knows no pre-tokenizer for its "
                         f"split pattern {pattern[:60]!r}... (known: GPT-2's and cl100k's)")
    return known[pattern]


def tokenizer_json_pre(spec):
    """llama.cpp's pre-tokenizer name for a tokenizer.json (its parsed JSON) that llama.cpp tokenizes
    the same way: a byte-level BPE (GPT-2's kind) without a normalizer, split by GPT-2's pattern (the
    ByteLevel pre-tokenizer's own) or by a Split pattern llama.cpp knows. Anything else is refused:
    llama.cpp splits text with built-in patterns only, so another one would tokenize differently."""
    model, pre = spec['model'], spec.get('pre_tokenizer') or {}
    steps = pre.get('pretokenizers', []) if pre.get('type') == 'Sequence' else [pre]
    byte_level = steps[-1] if steps and steps[-1].get('type') == 'ByteLevel' else None
    name = None
    if byte_level and len(steps) == 1 and byte_level.get('use_regex', True):
        name = 'gpt-2'
    elif byte_level and len(steps) == 2 and steps[0].get('type') == 'Split' and not byte_level.get('use_regex', True):
        name = known_split_patterns().get((steps[0].get('pattern') or {}).get('Regex'))
    why = ("its model is " + str(model.get('type')) if model.get('type') != 'BPE' else
           "it has a normalizer" if spec.get('normalizer') else
           "it is not byte-level (a ByteLevel pre-tokenizer)" if not byte_level else
           "its ByteLevel pre-tokenizer adds a prefix space" if byte_level.get('add_prefix_space') else
           "llama.cpp knows no pre-tokenizer for its split pattern (known: GPT-2's and cl100k's; mirim's own "
           "bytelevel pattern keeps combining marks with letters, which none of llama.cpp's does)" if name is None
           else None)
    if why:
        raise ValueError(f"cannot write a GGUF of this tokenizer.json: {why}; llama.cpp would tokenize text "
                         f"differently than mirim")
    return name


def byte_level_vocab(spec, vocab_size):
    """(tokens, types, merges) of a byte-level BPE, from its tokenizer.json (parsed), as llama.cpp's
    'gpt2' model: tokens spelled with GPT-2's byte characters, merges as 'a b' strings in rank order,
    added tokens CONTROL (special ones) or USER_DEFINED."""
    import gguf
    model = spec['model']
    tokens = [None] * vocab_size
    types = [gguf.TokenType.NORMAL] * vocab_size
    for piece, i in model['vocab'].items():
        tokens[i] = piece
    for added in spec.get('added_tokens') or []:
        tokens[added['id']] = added['content']
        types[added['id']] = gguf.TokenType.CONTROL if added.get('special') else gguf.TokenType.USER_DEFINED
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise ValueError(f"cannot write a GGUF of this tokenizer: ids {missing[:5]} have no token")
    merges = [m if isinstance(m, str) else ' '.join(m) for m in model.get('merges') or []]
    return tokens, types, merges


def add_vocab(writer, tok, vocab_size):
    """The tokenizer's metadata: tokens, scores/merges, types, special ids, chat template."""
    import gguf
    if tok.kind == 'sentencepiece':
        tokens, scores, types, space_prefix = sentencepiece_vocab(tok)
        model_name, pre, merges = 'llama', 'default', None
    else:  # byte-level BPE: a tokenizer.json as it is, bytes and tiktoken as export.py writes them
        spec = json.loads((tok._backend if tok.kind == 'tokenizers' else byte_level_backend(tok)).to_str())
        pre = tokenizer_json_pre(spec) if tok.kind == 'tokenizers' else byte_level_pre(tok)
        tokens, types, merges = byte_level_vocab(spec, tok.vocab_size)
        scores, space_prefix, model_name = None, False, 'gpt2'
    # a model may have more embeddings than the tokenizer has ids: name them, never produced by text
    for i in range(len(tokens), vocab_size):
        tokens.append(f'[PAD{i}]'.encode('utf-8') if tok.kind == 'sentencepiece' else f'[PAD{i}]')
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(-10000.0)
    writer.add_tokenizer_model(model_name)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        # llama.cpp requires the key and gguf-py writes no empty array: 'bytes' (no merges) gets one
        # that never applies, a pair of special tokens (text is split into characters, never into those)
        names = {i: p for p, i in tok.special_tokens.items()}
        writer.add_token_merges(merges or [f'{names[tok.bos_id]} {names[tok.eos_id]}'])
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    if tok.pad_id is not None:
        writer.add_pad_token_id(tok.pad_id)
    if tok._unk_id is not None:
        writer.add_unk_token_id(tok._unk_id)
    writer.add_add_bos_token(True)  # mirim documents start with <bos>, in training and sampling
    writer.add_add_eos_token(False)
    lead = ''
    if tok.kind == 'sentencepiece':
        # see the module docstring: with a chat template the leading '▁' comes from the template
        writer.add_add_space_prefix(space_prefix and not tok.chat_template)
        lead = ' ' if space_prefix and tok.chat_template else ''
    if tok.chat_template:
        writer.add_chat_template(gguf_chat_template(tok.chat_template, lead))
    return lead


def gguf_chat_template(template, lead=''):
    """The Jinja chat template of tokenizer_config.json, with `lead` written right after <bos>."""
    jinja = chat_template_jinja(template)
    start = '{{ bos_token }}'
    assert jinja.startswith(start)
    return start + (f'{{{{ {lead!r} }}}}' if lead else '') + jinja[len(start):]


# -----------------------------------------------------------------------------
# ollama

def modelfile(gguf_name, tok, block_size, lead=''):
    """An ollama Modelfile: the chat template in Go template syntax, stop tokens, and sample.py's
    sampling defaults."""
    names = {i: p for p, i in tok.special_tokens.items()}
    eos = names.get(tok.eos_id, '')
    stops = []
    if tok.chat_template:
        template = chat_template_go(tok.chat_template, eos, lead)
        stops.append(get_template(tok.chat_template)['stop'].replace(EOS, eos))
    else:
        template = '{{ .Prompt }}'
    if eos and eos not in stops:
        stops.append(eos)
    lines = [f'FROM ./{gguf_name}']
    if lead:  # the one supported path, said where the template is (see the module docstring)
        lines += ["# This chat model's prompts start with a space after <s>, as mirim trained it: the",
                  "# TEMPLATE below writes it. Chat through this template (ollama run, /api/chat) or, in",
                  "# llama.cpp, through the template in the .gguf with --jinja: llama.cpp's built-in ChatML",
                  "# (no --jinja) leaves the space out. Plain text, not a chat (llama.cpp's completion),",
                  '# needs that space written first: " No princípio".']
    lines += [f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER temperature {KNOBS['temperature']}", f"PARAMETER top_k {KNOBS['top_k']}",
              f"PARAMETER top_p {KNOBS['top_p']}", f"PARAMETER repeat_penalty {KNOBS['repetition_penalty']}",
              f'PARAMETER num_ctx {block_size}']
    return '\n'.join(lines) + '\n'


# -----------------------------------------------------------------------------
# the file

FILE_TYPES = {'f32': 'ALL_F32', 'f16': 'MOSTLY_F16', 'q8_0': 'MOSTLY_Q8_0', 'q4_0': 'MOSTLY_Q4_0'}


def write_gguf(model, tok, path, qtype='f16', name=None, log=print):
    """Write model + tok as one GGUF file at path; returns the leading text a chat prompt needs."""
    import gguf
    if qtype not in GGUF_TYPES:
        raise ValueError(f"gguf_type={qtype!r}: choose from {', '.join(GGUF_TYPES)}")
    c = model.config
    arch = gguf_arch(c)
    if tok.vocab_size > c.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only {c.vocab_size}")
    if c.activation == 'gelu':
        log("note: llama.cpp computes GELU in its tanh form; this model's exact-erf GELU is approximated "
            "(at most 5e-4 apart per activation)")
    tensors = gguf_tensors(model, qtype, log)
    ffn = next(t.shape[0] for n, t, _ in tensors if n == 'blk.0.ffn_gate.weight')
    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name or os.path.splitext(os.path.basename(path))[0])
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_key_length(c.head_size)
    writer.add_value_length(c.head_size)
    writer.add_rope_dimension_count(c.head_size)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[qtype]))
    lead = add_vocab(writer, tok, c.vocab_size)
    for tensor_name, tensor, kind in tensors:
        data, raw = encode(tensor, kind)
        writer.add_tensor(tensor_name, data, raw_dtype=raw)
    # write to a temporary name, then move into place: no half-written .gguf is ever left behind
    tmp = path + '.tmp'
    try:
        writer.open_output_file(tmp)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno is None:  # numpy's tofile says only "N requested and M written" when the disk fills up
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            why = f"the write stopped short ({e}) with {free:,} bytes free on its disk: no space left?"
        raise OSError(f"cannot write {path}: {why}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lead


def export_gguf(source, dest, types=('f16',), checkpoint='ckpt.pt', log=print, overwrite=False):
    """Write dest/NAME-TYPE.gguf for each type and dest/Modelfile (ollama, from the first type) from a
    mirim out_dir, checkpoint file or Hugging Face folder. Returns the .gguf paths. A dest that holds
    such files already is refused unless overwrite, and then they all go first, those of the types not
    written now too (mirim/atomic.claim_folder); a dest that holds a training run or a data set is
    always refused; other files in it are left as they are."""
    types = [types] if isinstance(types, str) else list(types)
    bad = [t for t in types if t not in GGUF_TYPES]
    if bad or not types:
        raise ValueError(f"gguf_type={','.join(types)!r}: choose one or more of {', '.join(GGUF_TYPES)}")
    name = os.path.basename(os.path.normpath(dest))
    ours = {'Modelfile', *(f'{name}-{qtype}.gguf' for qtype in GGUF_TYPES)}
    old = claim_folder(dest, ours.__contains__, overwrite, 'a GGUF export', '--dest', refuse=OTHER_RESULTS)
    model, tok, ckpt = load_model(source, checkpoint=checkpoint)
    if 'head' in ckpt:  # refuse before anything is written, as the rest below
        raise ValueError(f"{source} is a classifier (classify.py): GGUF has no place for its classification head, "
                         f"and its backbone alone is no language model it was trained to be. Export it with "
                         f"--format=hf (LlamaForSequenceClassification)")
    gguf_arch(model.config)
    os.makedirs(dest, exist_ok=True)
    for stale in old:  # first: they free their space for the new files
        os.remove(os.path.join(dest, stale))
    paths = []
    for qtype in types:
        path = os.path.join(dest, f'{name}-{qtype}.gguf')
        lead = write_gguf(model, tok, path, qtype, name=name, log=log)
        log(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, arch {gguf_arch(model.config)}, {qtype})")
        paths.append(path)
    write_atomic(os.path.join(dest, 'Modelfile'),
                 modelfile(os.path.basename(paths[0]), tok, model.config.block_size, lead).encode('utf-8'))
    return paths
