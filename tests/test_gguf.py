"""gguf_export.py: mirim -> GGUF, checked two ways: the written metadata and a re-implementation of
llama.cpp's two graphs read back with gguf's own GGUFReader (always), and llama.cpp itself through
llama-cpp-python (skipped when it is not installed)."""
import math
import os
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from mirim.chat import chat_ids  # noqa: E402
from conftest import tiny_sentencepieces, word_rotations  # noqa: E402
from mirim.generate import generate  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402
from mirim.tokenizer import load_tokenizer  # noqa: E402

gguf = pytest.importorskip('gguf')
from mirim import gguf_export  # noqa: E402

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(
    llama_cpp is None, reason="llama_cpp is not importable: `pip install llama-cpp-python` builds llama.cpp from "
                              "source (README: GGUF); these tests compare mirim with llama.cpp itself")

pytestmark = pytest.mark.usefixtures('one_thread')

SAMPLES = {
    'portuguese': "No princípio criou Deus os céus e a terra. Ação, coração, pão e avó! Custa R$ 3,50.",
    'hindi': "आदि में परमेश्वर ने आकाश और पृथ्वी की सृष्टि की। क़लम और ज़मीन",
    'chat': "<|im_start|>user\nOlá, tudo bem? नमस्ते<|im_end|>\n<|im_start|>assistant\nTudo! 🙂<|im_end|>\n",
}
VOCAB = 400
PROMPT = [5, 77, 123, 9, 250, 31, 8]


@pytest.fixture(scope='module')
def sp_toks(tmp_path_factory):
    more = ["আদিতে ঈশ্বর আকাশমণ্ডল ও পৃথিবী সৃষ্টি করলেন।", "Hapo mwanzo Mungu aliziumba mbingu na nchi."]
    return tiny_sentencepieces(word_rotations([*SAMPLES.values(), *more]), tmp_path_factory, VOCAB)


def with_chat(tok, template='chatml'):
    return load_tokenizer({**tok.to_dict(), 'chat_template': template})


def sharp_model(activation, n_kv_head, tied, seed, n_embd=64, ffn_hidden=88):
    """A random model whose next-token choice is clear-cut (big embedding), so that greedy decoding
    compares implementations, not rounding between two near-equal logits. The MLP is 88 wide: not
    a multiple of 32, as the demo's 688 is not."""
    config = LlamaConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=n_embd,
                         ffn_hidden=ffn_hidden, activation=activation, tie_embeddings=tied, rope_theta=5000.0,
                         norm_eps=1e-5, bos_id=1, eos_id=2, pad_id=3)
    model = Llama(config, seed=seed)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(50.0)
        if not tied:
            model.output.weight.mul_(50.0)
    return model.eval()


def mirim_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].numpy()


# -----------------------------------------------------------------------------
# llama.cpp's graphs, re-implemented from the GGUF file alone (src/models/llama.cpp, gemma.cpp)

def read_gguf(path):
    reader = gguf.GGUFReader(path)
    fields = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        fields[name] = bytes(value).decode('utf-8') if field.types[0] == gguf.GGUFValueType.STRING else value[0].item()
    tensors = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
               .reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}
    return reader, fields, tensors


def field_array(reader, key):
    field = reader.fields[key]
    if field.types[1] == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode('utf-8') for i in field.data]
    return [field.parts[i][0].item() for i in field.data]


def ggml_graph_logits(path, ids):
    """What llama.cpp's 'llama' or 'gemma' graph computes from this file, in float32 torch."""
    _, f, t = read_gguf(path)
    arch = f['general.architecture']
    d, heads, kv_heads = f[f'{arch}.embedding_length'], f[f'{arch}.attention.head_count'], f[f'{arch}.attention.head_count_kv']
    eps, theta, hs = f[f'{arch}.attention.layer_norm_rms_epsilon'], f[f'{arch}.rope.freq_base'], d // heads
    T = len(ids)
    x = t['token_embd.weight'][ids]
    if arch == 'gemma':
        x = x * math.sqrt(d)
    pos = torch.arange(T, dtype=torch.float64)
    angles = torch.outer(pos, theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)).float()
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (T, 1, hs/2)

    def rope(v):  # (T, heads, hs)
        if arch == 'llama':  # adjacent pairs
            a, b = v[..., 0::2], v[..., 1::2]
            return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        a, b = v[..., :hs // 2], v[..., hs // 2:]  # NEOX: halves
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    def norm(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w

    for i in range(f[f'{arch}.block_count']):
        b = f'blk.{i}.'
        h = norm(x, t[b + 'attn_norm.weight'])
        q = rope((h @ t[b + 'attn_q.weight'].T).view(T, heads, hs))
        k = rope((h @ t[b + 'attn_k.weight'].T).view(T, kv_heads, hs))
        v = (h @ t[b + 'attn_v.weight'].T).view(T, kv_heads, hs)
        k, v = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (k, v))
        y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        x = x + y.transpose(0, 1).reshape(T, d) @ t[b + 'attn_output.weight'].T
        h = norm(x, t[b + 'ffn_norm.weight'])
        gate = h @ t[b + 'ffn_gate.weight'].T
        act = F.silu(gate) if arch == 'llama' else F.gelu(gate, approximate='tanh')
        x = x + (act * (h @ t[b + 'ffn_up.weight'].T)) @ t[b + 'ffn_down.weight'].T
    head = t.get('output.weight', t['token_embd.weight'])
    return (norm(x, t['output_norm.weight']) @ head.T).numpy()


CASES = [('silu', 4, True), ('silu', 2, False), ('silu', 1, True), ('silu', 4, False),
         ('gelu_tanh', 4, True), ('gelu_tanh', 2, True), ('gelu', 1, True)]
CASE_IDS = [f'{a}-kv{k}-{"tied" if t else "untied"}' for a, k, t in CASES]
# max |logit difference| allowed per type, on logits that span about +-40 (sharp_model)
GRAPH_TOLERANCE = {'f32': 2e-3, 'f16': 0.1, 'q8_0': 0.5, 'q4_0': 3.0}


@pytest.fixture(scope='module', params=CASES, ids=CASE_IDS)
def exported(request, sp_toks, tmp_path_factory):
    """(mirim model, {type: path}) for one case, in every GGUF type."""
    activation, kv, tied = request.param
    model = sharp_model(activation, kv, tied, seed=CASES.index(request.param))
    root = tmp_path_factory.mktemp('gguf')
    paths = {q: str(root / f'm-{q}.gguf') for q in gguf_export.GGUF_TYPES}
    for q, path in paths.items():
        gguf_export.write_gguf(model, sp_toks['bpe'], path, q, log=lambda *a: None)
    return model, paths


@pytest.mark.parametrize('qtype', gguf_export.GGUF_TYPES)
def test_the_files_compute_mirims_logits_in_llama_cpps_graph(exported, qtype):
    model, paths = exported
    ids = PROMPT + list(range(40, 60))
    expected = mirim_logits(model, ids)
    got = ggml_graph_logits(paths[qtype], ids)
    extra = 1e-2 if model.config.activation == 'gelu' and qtype == 'f32' else 0.0  # erf vs tanh GELU
    assert np.abs(got - expected).max() < GRAPH_TOLERANCE[qtype] + extra
    if qtype in ('f32', 'f16'):
        assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_untied_geglu_is_refused_by_name(tmp_path, sp_toks):
    model = sharp_model('gelu_tanh', 4, False, seed=0)
    with pytest.raises(ValueError, match='untied GeGLU'):
        gguf_export.write_gguf(model, sp_toks['bpe'], str(tmp_path / 'x.gguf'), 'f16')
    assert not os.listdir(tmp_path)


def test_metadata_of_a_geglu_chat_model(tmp_path, sp_toks):
    tok = with_chat(sp_toks['bpe'])
    model = sharp_model('gelu_tanh', 2, True, seed=1)
    path = str(tmp_path / 'chat-q8_0.gguf')
    printed = []
    gguf_export.write_gguf(model, tok, path, 'q8_0', log=printed.append)
    assert any('padded to 96' in line for line in printed)
    reader, f, t = read_gguf(path)
    assert f['general.architecture'] == 'gemma' and f['general.file_type'] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (f['gemma.block_count'], f['gemma.embedding_length'], f['gemma.feed_forward_length']) == (2, 64, 96)
    assert (f['gemma.attention.head_count'], f['gemma.attention.head_count_kv'], f['gemma.attention.key_length']) == (4, 2, 16)
    assert f['gemma.rope.freq_base'] == 5000.0 and f['gemma.context_length'] == 64
    assert 'output.weight' not in t  # gemma reads its head from token_embd
    types = {x.name: x.tensor_type for x in reader.tensors}
    assert types['blk.0.ffn_down.weight'] == gguf.GGMLQuantizationType.Q8_0
    assert types['blk.0.ffn_norm.weight'] == gguf.GGMLQuantizationType.F32
    assert f['tokenizer.ggml.model'] == 'llama' and f['tokenizer.ggml.add_bos_token'] is True
    assert (f['tokenizer.ggml.bos_token_id'], f['tokenizer.ggml.eos_token_id'], f['tokenizer.ggml.padding_token_id']) == (1, 2, 3)
    # a chat model: the template writes the leading '▁' that SentencePiece adds once
    assert f['tokenizer.ggml.add_space_prefix'] is False
    assert f['tokenizer.chat_template'].startswith("{{ bos_token }}{{ ' ' }}") and '<|im_start|>' in f['tokenizer.chat_template']
    tokens, kinds = field_array(reader, 'tokenizer.ggml.tokens'), field_array(reader, 'tokenizer.ggml.token_type')
    assert len(tokens) == VOCAB
    for piece in ('<|im_start|>', '<|im_end|>', '<s>', '</s>'):
        assert kinds[tokens.index(piece)] == gguf.TokenType.CONTROL
    assert kinds[tokens.index('<0x41>')] == gguf.TokenType.BYTE


def test_base_model_keeps_the_space_prefix_and_llama_arch(tmp_path, sp_toks):
    path = str(tmp_path / 'base.gguf')
    gguf_export.write_gguf(sharp_model('silu', 4, False, seed=2), sp_toks['bpe'], path, 'f16')
    reader, f, t = read_gguf(path)
    assert f['general.architecture'] == 'llama' and f['llama.rope.dimension_count'] == 16
    assert f['tokenizer.ggml.add_space_prefix'] is True and 'tokenizer.chat_template' not in f
    assert 'output.weight' in t and f['llama.feed_forward_length'] == 88  # f16: no padding needed


def test_unigram_sentencepiece_is_refused(tmp_path, sp_toks):
    with pytest.raises(ValueError, match='unigram'):
        gguf_export.write_gguf(sharp_model('silu', 4, True, 0), sp_toks['unigram'], str(tmp_path / 'u.gguf'), 'f16')


def tiny_tiktoken(tmp_path):
    import base64
    merges = [b'de', b'ra', b' a', b'ra ', b'\xc3\xa7', b'\xc3\xa3', b'\xc3\xa7\xc3\xa3', b' d', b' de', b'\xe0\xa4']
    ranks = tmp_path / 'tiny.tiktoken'
    ranks.write_bytes(b''.join(base64.b64encode(t) + b' %d\n' % i
                               for i, t in enumerate([bytes([b]) for b in range(256)] + merges)))
    return load_tokenizer({'kind': 'tiktoken', 'path': str(ranks), 'ranks': ranks.read_bytes(),
                           'extra_special_tokens': ['<|im_start|>', '<|im_end|>']})


def small_model(tok):
    return Llama(LlamaConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                             ffn_hidden=32, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id), seed=0)


def test_byte_level_vocabularies(tmp_path):
    for tok, pre in ((load_tokenizer('bytes'), 'default'), (tiny_tiktoken(tmp_path), 'llama-bpe')):
        path = str(tmp_path / f'{tok.kind}.gguf')
        gguf_export.write_gguf(small_model(tok), tok, path, 'f32')
        reader, f, _ = read_gguf(path)
        assert (f['tokenizer.ggml.model'], f['tokenizer.ggml.pre']) == ('gpt2', pre)
        tokens, kinds = field_array(reader, 'tokenizer.ggml.tokens'), field_array(reader, 'tokenizer.ggml.token_type')
        assert tokens[tok.token_to_id('<|im_end|>')] == '<|im_end|>'
        assert kinds[tok.token_to_id('<|im_end|>')] == gguf.TokenType.CONTROL
        assert tokens[ord('A')] == 'A' and tokens[ord(' ')] == 'Ġ'  # GPT-2's byte characters
        merges = field_array(reader, 'tokenizer.ggml.merges')
        assert ('d e' in merges) == (tok.kind == 'tiktoken')


def tiny_tokenizer_json(tmp_path, split_pattern=None):
    """A byte-level BPE tokenizer.json trained here with the tokenizers library: GPT-2's kind (the
    ByteLevel pre-tokenizer's own pattern), or split by split_pattern first."""
    from tokenizers import Regex, Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    backend = Backend(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_pattern is None)
    backend.pre_tokenizer = byte_level if split_pattern is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split_pattern), behavior='isolated'), byte_level])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=['<s>', '</s>', '<pad>', '<|im_start|>', '<|im_end|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([text * 3 for text in SAMPLES.values()], trainer)
    path = tmp_path / f"tokenizer-{'gpt2' if split_pattern is None else 'split'}.json"
    backend.save(str(path))
    return load_tokenizer(str(path))


def tokenizer_json_cases(tmp_path):
    from mirim.tokenizer import CL100K_PATTERN
    return [(tiny_tokenizer_json(tmp_path), 'gpt-2'), (tiny_tokenizer_json(tmp_path, CL100K_PATTERN), 'llama-bpe')]


def test_tokenizer_json_vocabularies(tmp_path):
    for tok, pre in tokenizer_json_cases(tmp_path):
        assert tok.kind == 'tokenizers'
        path = str(tmp_path / f'{pre}.gguf')
        gguf_export.write_gguf(small_model(tok), tok, path, 'f32')
        reader, f, _ = read_gguf(path)
        assert (f['tokenizer.ggml.model'], f['tokenizer.ggml.pre']) == ('gpt2', pre)
        tokens, kinds = field_array(reader, 'tokenizer.ggml.tokens'), field_array(reader, 'tokenizer.ggml.token_type')
        im_end = tok.token_to_id('<|im_end|>')
        assert tokens[im_end] == '<|im_end|>' and kinds[im_end] == gguf.TokenType.CONTROL
        assert len(field_array(reader, 'tokenizer.ggml.merges')) > 0


def test_tokenizer_json_llama_cpp_cannot_split_alike_is_refused(tmp_path):
    from mirim.tokenizer import train_bytelevel_bpe
    own = train_bytelevel_bpe(iter(SAMPLES.values()), str(tmp_path / 'tokenizer.json'), vocab_size=300)
    with pytest.raises(ValueError, match='no pre-tokenizer for its split pattern'):
        gguf_export.write_gguf(small_model(own), own, str(tmp_path / 'own.gguf'), 'f32')


def test_export_writes_every_type_and_an_ollama_modelfile(tmp_path, sp_toks):
    out = tmp_path / 'run'
    out.mkdir()
    tok = with_chat(sp_toks['bpe'])
    model = sharp_model('silu', 2, True, seed=3)
    torch.save({'model': model.state_dict(), 'model_config': asdict(model.config), 'tokenizer': tok.to_dict()},
               out / 'ckpt.pt')
    paths = gguf_export.export_gguf(str(out), str(tmp_path / 'g' / 'pt'), ['q8_0', 'f16'], log=lambda *a: None)
    assert [os.path.basename(p) for p in paths] == ['pt-q8_0.gguf', 'pt-f16.gguf']
    text = (tmp_path / 'g' / 'pt' / 'Modelfile').read_text()
    assert text.startswith('FROM ./pt-q8_0.gguf\n')
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "</s>"' in text
    assert '--jinja' in text and '" No princípio"' in text  # the one supported path, said beside the template
    assert 'TEMPLATE """{{ " " }}{{- range .Messages }}{{ if eq .Role "system" }}' in text
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in text
    assert 'PARAMETER num_ctx 64' in text and 'PARAMETER temperature 0.8' in text
    with pytest.raises(ValueError, match='q4_K'):
        gguf_export.export_gguf(str(out), str(tmp_path / 'g2'), ['q4_K'])


# -----------------------------------------------------------------------------
# llama.cpp itself

def llama_logits(path, ids, f32_cache=False):
    cache = {'type_k': llama_cpp.GGML_TYPE_F32, 'type_v': llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False, **cache)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32), llm


def llama_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


# max |logit difference| allowed against mirim, on these random models' logits (about -40..75). Measured
# with llama-cpp-python 0.3.36, every case: f32 <= 1.2e-4, f16 <= 1.4e-2, q8_0 <= 0.32, q4_0 <= 0.32 (the
# q8_0 embedding and head dominate both: sharp_model's embedding is 50x, so the residual is mostly it).
# Trained models differ more (README, GGUF: tools/gguf_logits.py measures them)
LLAMA_CPP_TOLERANCE = {'f32': 1e-3, 'f16': 0.05, 'q8_0': 0.6, 'q4_0': 1.0}


@needs_llama_cpp
@pytest.mark.parametrize('qtype', gguf_export.GGUF_TYPES)
def test_llama_cpp_computes_what_mirim_computes(exported, qtype):
    model, paths = exported
    ids = PROMPT + list(range(40, 60))
    expected = mirim_logits(model, ids)
    got, llm = llama_logits(paths[qtype], ids)
    diff = np.abs(got - expected).max()
    print(f'{model.config.activation} {qtype}: max logit difference {diff:.2e}')
    assert diff < LLAMA_CPP_TOLERANCE[qtype]
    if qtype == 'f32' and model.config.activation == 'silu':
        # what an f32 SwiGLU file still differs by is llama.cpp's f16 KV cache: with an f32 one it is float rounding
        exact, _ = llama_logits(paths[qtype], ids, f32_cache=True)
        print(f'silu f32, f32 KV cache: max logit difference {np.abs(exact - expected).max():.2e}')
        assert np.abs(exact - expected).max() < 5e-5
    if qtype in ('f32', 'f16'):
        mine = generate(model, torch.tensor([PROMPT]), max_new_tokens=20, temperature=0)[0, len(PROMPT):].tolist()
        assert llama_greedy(llm, PROMPT, 20) == mine


def llama_vocab(path):
    return llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)


@needs_llama_cpp
def test_llama_cpp_tokenizes_as_mirim(tmp_path, sp_toks):
    base, chat = sp_toks['bpe'], with_chat(sp_toks['bpe'])
    model = sharp_model('silu', 4, True, seed=0)
    for tok, name in ((base, 'base'), (chat, 'chat')):
        gguf_export.write_gguf(model, tok, str(tmp_path / f'{name}.gguf'), 'f32')
    base_llm, chat_llm = llama_vocab(str(tmp_path / 'base.gguf')), llama_vocab(str(tmp_path / 'chat.gguf'))
    for text in (SAMPLES['portuguese'], SAMPLES['hindi'], SAMPLES['portuguese'] + '\n' + SAMPLES['hindi']):
        assert base_llm.tokenize(text.encode(), add_bos=True, special=True) == base.encode(text, bos=True)
    # a chat model: texts with chat tokens, the space that SentencePiece puts first written by the caller
    for text in SAMPLES.values():
        assert chat_llm.tokenize((' ' + text).encode(), add_bos=False, special=True) == chat.encode(text)
    # and the chat template in the file renders what mirim's chat_ids feeds the model
    from jinja2 import Template
    messages = [{'role': 'system', 'content': 'Seja breve.'}, {'role': 'user', 'content': 'Olá! नमस्ते'}]
    template = read_gguf(str(tmp_path / 'chat.gguf'))[1]['tokenizer.chat_template']
    prompt = Template(template).render(messages=messages, bos_token='<s>', eos_token='</s>', add_generation_prompt=True)
    ids, _ = chat_ids(messages, 'chatml', chat, add_generation_prompt=True)
    assert chat_llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids


@needs_llama_cpp
def test_llama_cpp_tokenizes_byte_level_vocabularies_as_mirim(tmp_path):
    for tok in (load_tokenizer('bytes'), tiny_tiktoken(tmp_path)):
        path = str(tmp_path / f'{tok.kind}.gguf')
        gguf_export.write_gguf(small_model(tok), tok, path, 'f32')
        llm = llama_vocab(path)
        for text in SAMPLES.values():
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text, bos=True), (tok.kind, text)


@needs_llama_cpp
def test_llama_cpp_tokenizes_tokenizer_json_vocabularies_as_mirim(tmp_path):
    for tok, pre in tokenizer_json_cases(tmp_path):
        path = str(tmp_path / f'{pre}.gguf')
        gguf_export.write_gguf(small_model(tok), tok, path, 'f32')
        llm = llama_vocab(path)
        for text in SAMPLES.values():
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text, bos=True), (pre, text)


def test_a_classifier_is_refused_with_the_reason(tmp_path, sp_toks):
    # a classify.py checkpoint: the backbone alone would make a language model it was never trained as
    out = tmp_path / 'run'
    out.mkdir()
    model = sharp_model('silu', 4, True, seed=4)
    torch.save({'model': model.state_dict(), 'model_config': asdict(model.config), 'tokenizer': sp_toks['bpe'].to_dict(),
                'head': {'weight': torch.zeros(2, 64)}, 'labels': ['neg', 'pos']}, out / 'classifier.pt')
    with pytest.raises(ValueError, match=r'classifier.*no place for its classification head.*--format=hf'):
        gguf_export.export_gguf(str(out), str(tmp_path / 'g'), ['f16'], checkpoint='classifier.pt', log=lambda *a: None)
    assert not (tmp_path / 'g').exists()


CHAT = [{'role': 'system', 'content': 'Seja breve.'}, {'role': 'user', 'content': 'Olá! नमस्ते'},
        {'role': 'assistant', 'content': 'Oi.'}, {'role': 'user', 'content': 'Tudo bem?'}]


def builtin_chat_prompt(template, messages):
    """llama.cpp's own (non-Jinja) rendering of a chat: what llama-cli and llama-server do without --jinja."""
    import ctypes
    array = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=m['role'].encode(), content=m['content'].encode()) for m in messages])
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(template.encode(), array, len(messages), True, buf, len(buf))
    assert 0 < n < len(buf)
    return buf.raw[:n].decode('utf-8')


@needs_llama_cpp
def test_llama_cpp_chat_paths_on_a_chat_gguf(tmp_path, sp_toks):
    """The README's GGUF section: a chat GGUF gives mirim's ids through its Jinja template (llama.cpp with
    --jinja, llama-cpp-python's chat completion, ollama's Modelfile), and plain text when it starts with
    a space; llama.cpp's built-in ChatML (no --jinja) misses exactly the one '▁' after <s>."""
    chat = with_chat(sp_toks['bpe'])
    path = str(tmp_path / 'chat.gguf')
    gguf_export.write_gguf(sharp_model('silu', 4, True, seed=0), chat, path, 'f32')
    llm = llama_vocab(path)
    ids, _ = chat_ids(CHAT, 'chatml', chat, add_generation_prompt=True)
    # llama-cpp-python's chat completion renders the file's Jinja template and tokenizes it as below
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    template = read_gguf(path)[1]['tokenizer.chat_template']
    rendered = Jinja2ChatFormatter(template, eos_token='</s>', bos_token='<s>')(messages=CHAT)
    assert llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True) == ids
    # the built-in ChatML: the same text but for the leading space the Jinja template writes
    builtin = builtin_chat_prompt(template, CHAT)
    assert builtin == rendered.prompt[len('<s> '):]
    assert ids[1] == chat.token_to_id('\u2581')  # SentencePiece's '▁' before the first chat token
    assert llm.tokenize(builtin.encode(), add_bos=True, special=True) == ids[:1] + ids[2:]
    # plain text: the leading '▁' SentencePiece adds is the caller's to write
    for text in (SAMPLES['portuguese'], SAMPLES['hindi']):
        assert llm.tokenize((' ' + text).encode(), add_bos=True, special=True) == chat.encode(text, bos=True)
        assert llm.tokenize(text.encode(), add_bos=True, special=True) != chat.encode(text, bos=True)
