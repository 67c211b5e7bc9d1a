"""export.py: mirim -> Hugging Face transformers and back, checked against transformers itself."""
import json
import os
import re
import sys
from dataclasses import asdict, replace

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import export  # noqa: E402
from mirim import hf_tokenizer  # noqa: E402
from mirim.chat import chat_ids, CHAT_TEMPLATES  # noqa: E402
from mirim.checkpoint import load_model  # noqa: E402
from mirim.generate import generate  # noqa: E402
from mirim.hf import load_hf  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402
from mirim.sampling import continuation_text
from sample import main as sample_main  # noqa: E402
from conftest import tiny_sentencepieces, word_rotations  # noqa: E402
from mirim.tokenizer import load_tokenizer  # noqa: E402

transformers = pytest.importorskip('transformers')
safetensors_torch = pytest.importorskip('safetensors.torch')
transformers.logging.set_verbosity_error()

SAMPLES = {
    'portuguese': "No princípio criou Deus os céus e a terra. Ação, coração, pão e avó! Custa R$ 3,50.",
    'hindi': "आदि में परमेश्वर ने आकाश और पृथ्वी की सृष्टि की। क़लम और ज़मीन",
    'emoji': "Bom dia 😀🚀 👩🏽‍💻 🇧🇷 tudo bem?",
    'spaces': "  two leading spaces,\ttabs\nand new lines\n\n  ",
    'chat': "<|im_start|>user\nOlá, tudo bem?<|im_end|>\n<|im_start|>assistant\nTudo! 🙂<|im_end|>",
    'chat inside text': "a<|im_end|> b <|im_start|><|im_start|>x",
}
VOCAB = 400


pytestmark = pytest.mark.usefixtures('one_thread')


def training_text():
    more = ["আদিতে ঈশ্বর আকাশমণ্ডল ও পৃথিবী সৃষ্টি করলেন।", "起初，神创造天地。地是空虚混沌，渊面黑暗。"]
    return word_rotations([*SAMPLES.values(), *more])


@pytest.fixture(scope='module')
def sp_toks(tmp_path_factory):
    """A tiny SentencePiece BPE and unigram model (with ChatML tokens), trained once."""
    return tiny_sentencepieces(training_text(), tmp_path_factory, VOCAB)


def save_checkpoint(out_dir, model, tok, **extra):
    os.makedirs(out_dir, exist_ok=True)
    ckpt = {'model': model.state_dict(), 'model_config': asdict(model.config), 'tokenizer': tok.to_dict(),
            'config': {'data_dir': 'data/biblia/pt', 'learning_rate': 3e-4}, 'step': 1000, 'tokens_seen': 4_096_000,
            'val_loss': 2.3456, 'val_bpb': 1.2345, 'best_val_loss': 2.3, 'data_dir': 'data/biblia/pt', **extra}
    torch.save(ckpt, os.path.join(out_dir, 'ckpt.pt'))


def sharp_model(config, seed, scale=50.0):
    """A random model whose next-token choice is clear-cut (big embedding), so greedy decoding
    compares implementations, not float rounding between two near-equal logits."""
    model = Llama(config, seed=seed)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(scale)
        if not config.tie_embeddings:
            model.output.weight.mul_(scale)
    return model.eval()


# activation, n_head / n_kv_head, tied: every activation, every GQA ratio, tied and untied
EXPORT_CASES = [('silu', 1, True), ('silu', 2, False), ('silu', 4, True),
                ('gelu_tanh', 1, False), ('gelu_tanh', 2, True), ('gelu', 4, False), ('gelu', 1, True)]


@pytest.fixture(scope='module', params=EXPORT_CASES, ids=lambda c: f'{c[0]}-gqa{c[1]}-{"tied" if c[2] else "untied"}')
def exported(request, sp_toks, tmp_path_factory):
    """(mirim model, transformers model loaded from the exported folder) for one case."""
    activation, ratio, tied = request.param
    config = LlamaConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=4 // ratio, n_embd=32,
                         ffn_hidden=48, activation=activation, tie_embeddings=tied, rope_theta=5000.0, norm_eps=1e-5)
    model = sharp_model(config, seed=EXPORT_CASES.index(request.param))
    root = tmp_path_factory.mktemp('export')
    save_checkpoint(str(root / 'out'), model, sp_toks['bpe'])
    export.export(str(root / 'out'), str(root / 'hf'))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(root / 'hf')).eval()
    return model, hf_model


def test_exported_logits_match_mirim(exported):
    model, hf_model = exported
    idx = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(idx)[0] - hf_model(idx).logits).abs().max().item()
    assert diff < 1e-4


def test_exported_greedy_generation_matches_mirim_for_32_tokens(exported):
    model, hf_model = exported
    idx = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    hf_model.generation_config.eos_token_id = None  # mirim's generate below does not stop at eos either
    ours = generate(model, idx, max_new_tokens=32, temperature=0)
    theirs = hf_model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=32, do_sample=False,
                               pad_token_id=3)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize('tied', [True, False], ids=['tied-gemma', 'untied-llama'])
def test_exact_gelu_exports_the_trained_function(sp_toks, tmp_path, tied):
    # transformers' GemmaConfig reads hidden_act="gelu" as the tanh form: the export must say exact GELU so
    # that transformers keeps it (a tied model is written as Gemma, an untied one as Llama)
    config = LlamaConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                         ffn_hidden=128, activation='gelu', tie_embeddings=tied, rope_theta=5000.0, norm_eps=1e-5)
    model = sharp_model(config, seed=5)
    with torch.no_grad():
        for layer in model.layers:  # gates of order 1, where erf and tanh GELU differ most
            layer.feed_forward.w13.weight.mul_(10.0)
    idx = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    tanh_twin = Llama(replace(config, activation='gelu_tanh')).eval()
    tanh_twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = model(idx)[0]
        assert (expected - tanh_twin(idx)[0]).abs().max().item() > 1e-3  # this model tells the two GELUs apart
    save_checkpoint(str(tmp_path / 'out'), model, sp_toks['bpe'])
    export.export(str(tmp_path / 'out'), str(tmp_path / 'hf'))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf')).eval()
    assert type(hf_model).__name__ == ('GemmaForCausalLM' if tied else 'LlamaForCausalLM')
    with torch.no_grad():
        assert (expected - hf_model(idx).logits).abs().max().item() < 1e-4
    back, _ = load_hf(str(tmp_path / 'hf'), tokenizer=False)  # and it imports as exact GELU again
    assert back.config.activation == 'gelu'


def classifier_checkpoint(out_dir, tok):
    """A classify.py-style checkpoint of a tied GeGLU backbone (its head: labels x n_embd)."""
    config = LlamaConfig(vocab_size=VOCAB, block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                         ffn_hidden=32, activation='gelu_tanh', tie_embeddings=True)
    save_checkpoint(out_dir, Llama(config, seed=0), tok, head={'weight': torch.randn(2, 16)}, labels=['neg', 'pos'])


def test_classifier_export_says_how_to_load_a_classifier(sp_toks, tmp_path, capsys):
    classifier_checkpoint(str(tmp_path / 'out'), sp_toks['bpe'])
    export.main([f'--out_dir={tmp_path / "out"}', f'--dest={tmp_path / "hf"}'])
    said = capsys.readouterr()
    assert 'AutoModelForSequenceClassification' in said.out and 'LlamaForSequenceClassification' in said.out
    assert 'CausalLM' not in said.out + said.err
    assert not (tmp_path / 'hf' / 'generation_config.json').exists()


@pytest.fixture(scope='module')
def tiny_export(sp_toks, tmp_path_factory):
    """A small exported folder with a ChatML chat template, shared by the checks below."""
    config = LlamaConfig(vocab_size=VOCAB, block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                         ffn_hidden=32, activation='gelu_tanh', tie_embeddings=True)
    tok = load_tokenizer(sp_toks['bpe'].to_dict())
    tok.chat_template = dict(CHAT_TEMPLATES['chatml'])  # as data/prepare_chat.py stores it
    root = tmp_path_factory.mktemp('tiny')
    save_checkpoint(str(root / 'out'), Llama(config, seed=0), tok)
    export.export(str(root / 'out'), str(root / 'hf'), dtype='bfloat16', license='apache-2.0')
    return str(root / 'hf'), tok


@pytest.mark.parametrize('name', SAMPLES)
def test_hf_tokenizer_gives_mirim_ids(tiny_export, name):
    dest, tok = tiny_export
    hf_tok = transformers.AutoTokenizer.from_pretrained(dest)
    assert hf_tok(SAMPLES[name])['input_ids'] == tok.encode(SAMPLES[name], bos=True)


@pytest.mark.parametrize('name', SAMPLES)
def test_hf_tokenizer_decodes_a_text_like_mirim(tiny_export, name):
    dest, tok = tiny_export
    hf_tok = transformers.AutoTokenizer.from_pretrained(dest)
    ids = hf_tok(SAMPLES[name])['input_ids']  # <s> first, as every text mirim trains on
    assert hf_tok.decode(ids) == tok.decode(ids) == SAMPLES[name]
    without_chat_tokens = SAMPLES[name].replace('<|im_start|>', '').replace('<|im_end|>', '')
    assert hf_tok.decode(ids, skip_special_tokens=True) == without_chat_tokens


@pytest.mark.parametrize('name', SAMPLES)
def test_hf_tokenizer_decodes_ids_without_bos_as_the_text_they_add(tiny_export, name):
    # what transformers' text-generation pipeline decodes: the new tokens alone, to go after the prompt
    dest, tok = tiny_export
    hf_tok = transformers.AutoTokenizer.from_pretrained(dest)
    context, ids = tok.encode('Deus disse', bos=True), tok.encode(SAMPLES[name])
    assert hf_tok.decode(ids) == continuation_text(tok, context, ids) == tok.decode(context + ids)[len('Deus disse'):]


def test_a_lone_bos_decodes_to_its_text(tiny_export):
    # lm-evaluation-harness adds no <s> to a prompt that starts with decode([bos]): '' would be every prompt
    dest, tok = tiny_export
    hf_tok = transformers.AutoTokenizer.from_pretrained(dest)
    assert hf_tok.decode(tok.bos_id) == '<s>' and hf_tok.decode([tok.bos_id, tok.bos_id]) == ''
    assert hf_tok('Deus disse')['input_ids'][0] == tok.bos_id


def test_hf_tokenizer_knows_the_special_tokens(tiny_export):
    dest, tok = tiny_export
    hf_tok = transformers.AutoTokenizer.from_pretrained(dest)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == (1, 2, 3, 0)
    assert hf_tok.convert_tokens_to_ids(['<|im_start|>', '<|im_end|>']) == [4, 5]


def test_hf_chat_template_gives_the_ids_mirim_trains_on(tiny_export):
    dest, tok = tiny_export
    hf_tok = transformers.AutoTokenizer.from_pretrained(dest)
    messages = [{'role': 'system', 'content': 'Você é útil.'}, {'role': 'user', 'content': 'Oi 👋🏽! नमस्ते'},
                {'role': 'assistant', 'content': 'Olá! Tudo bem?'}, {'role': 'user', 'content': 'Sim.'}]
    theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert theirs['input_ids'] == chat_ids(messages, 'chatml', tok, add_generation_prompt=True)[0]


def test_chat_template_with_eos_in_replies_gives_chat_ids(sp_toks, tmp_path):
    tok = load_tokenizer(sp_toks['bpe'].to_dict())
    tok.chat_template = 'aira'  # replies end with </s>: the text after it is encoded afresh
    hf_tokenizer.write_tokenizer(tok, str(tmp_path), 64)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{'role': 'user', 'content': ' Oi? '}, {'role': 'assistant', 'content': 'Olá.'},
                {'role': 'user', 'content': 'Tudo bem?'}]
    theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert theirs['input_ids'] == chat_ids(messages, 'aira', tok, add_generation_prompt=True)[0]


@pytest.mark.parametrize('kind', ['bpe', 'unigram'])
def test_tokenizer_json_matches_sentencepiece_on_many_strings(sp_toks, kind):
    import random
    tok = sp_toks[kind]
    backend = hf_tokenizer.tokenizer_backend(tok)
    rng = random.Random(0)
    alphabet = list(''.join(SAMPLES.values())) + ['<|im_start|>', '<|im_end|>', '  ', 'ქ']
    texts = [''.join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(2000)]
    # left out: a chat token alone, and '<s>' spelled in text, which transformers reads as the token
    # (SentencePiece as four characters); see sentencepiece_backend
    texts = [t for t in texts if t not in ('<|im_start|>', '<|im_end|>') and not any(
        control in t for control in ('<s>', '</s>', '<pad>', '<unk>'))]
    wrong = [t for t in texts if backend.encode(t, add_special_tokens=False).ids != tok.encode(t)]
    assert wrong == []


def test_export_check_catches_a_tokenizer_json_that_disagrees(sp_toks):
    from tokenizers import normalizers
    backend = hf_tokenizer.tokenizer_backend(sp_toks['bpe'])
    # the usual Llama conversion: a '▁' prepended to every string, chat tokens' own text included
    backend.normalizer = normalizers.Sequence([normalizers.Prepend('\u2581'), normalizers.Replace(' ', '\u2581')])
    with pytest.raises(ValueError, match='disagrees with the mirim tokenizer'):
        hf_tokenizer.check_tokenizer_ids(sp_toks['bpe'], backend)


def test_bytes_tokenizer_exports_as_byte_level(tmp_path):
    tok = load_tokenizer('bytes')
    hf_tokenizer.write_tokenizer(tok, str(tmp_path), 64)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = SAMPLES['emoji'] + SAMPLES['chat']
    assert hf_tok(text)['input_ids'] == tok.encode(text, bos=True)
    assert hf_tok.decode(tok.encode(text)) == text


def tiny_tiktoken(tmp_path):
    import base64
    merges = [b'de', b'ra', b' a', b'ra ', b'\xc3\xa7', b'\xc3\xa3', b'\xc3\xa7\xc3\xa3', b' d', b' de']
    ranks = tmp_path / 'tiny.tiktoken'
    ranks.write_bytes(b''.join(base64.b64encode(t) + b' %d\n' % i for i, t in enumerate([bytes([b]) for b in range(256)] + merges)))
    return load_tokenizer(f'tiktoken:{ranks}')


def test_tiktoken_tokenizer_exports_as_byte_level_bpe(tmp_path):
    tok = tiny_tiktoken(tmp_path)
    hf_tokenizer.write_tokenizer(tok, str(tmp_path / 'hf'), 64)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'hf'))
    text = 'Ação de graças, coração da terra: ' + SAMPLES['hindi'] + SAMPLES['chat']
    assert hf_tok(text)['input_ids'] == tok.encode(text, bos=True)


def test_config_json_describes_the_model(tiny_export):
    dest, _ = tiny_export
    with open(os.path.join(dest, 'config.json')) as f:
        config = json.load(f)
    # a tied GeGLU model: Gemma, the GELU-gated Llama that vLLM and llama.cpp's converter compute right too
    assert (config['architectures'], config['model_type']) == (['GemmaForCausalLM'], 'gemma')
    assert (config['hidden_activation'], config['num_key_value_heads'], config['head_dim']) == ('gelu_pytorch_tanh', 1, 8)
    assert (config['max_position_embeddings'], config['tie_word_embeddings'], config['torch_dtype']) == (64, True, 'bfloat16')
    assert (config['bos_token_id'], config['eos_token_id'], config['pad_token_id']) == (1, 2, 3)


def test_generation_config_stops_at_every_end_of_turn(tiny_export, sp_toks, tmp_path):
    dest, tok = tiny_export  # ChatML: a reply ends with <|im_end|>, a document with </s>
    generation = transformers.GenerationConfig.from_pretrained(dest)
    assert generation.eos_token_id == [tok.eos_id, tok.token_to_id('<|im_end|>')] == [2, 5]
    aira = load_tokenizer({**sp_toks['bpe'].to_dict(), 'chat_template': 'aira'})  # replies end with </s>
    save_checkpoint(str(tmp_path / 'out'), Llama(LlamaConfig(vocab_size=VOCAB, block_size=64, n_layer=1, n_head=2,
                                                             n_kv_head=2, n_embd=16, ffn_hidden=32), seed=0), aira)
    export.export(str(tmp_path / 'out'), str(tmp_path / 'hf'))
    assert transformers.GenerationConfig.from_pretrained(str(tmp_path / 'hf')).eos_token_id == 2


def test_bfloat16_export_writes_bfloat16_weights_without_a_separate_tied_head(tiny_export):
    dest, _ = tiny_export
    tensors = safetensors_torch.load_file(os.path.join(dest, 'model.safetensors'))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert 'lm_head.weight' not in tensors


def test_tied_export_loads_with_the_head_tied(tiny_export):
    dest, _ = tiny_export
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(dest)
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()


def test_model_card_reports_data_tokens_loss_and_license(tiny_export):
    dest, _ = tiny_export
    with open(os.path.join(dest, 'README.md'), encoding='utf-8') as f:
        card = f.read()
    for fact in ('data/biblia/pt', '4,096,000', '2.3456', '1.2345', 'license: apache-2.0', 'from_pretrained'):
        assert fact in card


def test_export_refuses_a_folder_with_other_weights(sp_toks, tiny_export, tmp_path):
    dest, _ = tiny_export
    (tmp_path / 'pytorch_model.bin').write_bytes(b'old')
    with pytest.raises(ValueError, match='pytorch_model.bin'):
        export.export(os.path.join(os.path.dirname(dest), 'out'), str(tmp_path))


def test_command_line_export(tiny_export, tmp_path):
    dest, _ = tiny_export
    export.main([f'--out_dir={os.path.dirname(dest)}/out', f'--dest={tmp_path}/cli', '--dtype=float16'])
    with open(tmp_path / 'cli' / 'config.json') as f:
        assert json.load(f)['torch_dtype'] == 'float16'


# ----------------------------------------------------------------------------- import

def random_hf_model(tmp_path, tied=False, kv_heads=2, **overrides):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                                      tie_word_embeddings=tied, rms_norm_eps=1e-5, **overrides)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(str(tmp_path))
    return hf_model


@pytest.mark.parametrize('tied,kv_heads', [(False, 2), (True, 4), (False, 1)])
def test_imported_model_gives_transformers_logits(tmp_path, tied, kv_heads):
    hf_model = random_hf_model(tmp_path, tied=tied, kv_heads=kv_heads, hidden_act='gelu_pytorch_tanh')
    model, _ = load_hf(str(tmp_path), tokenizer=False)
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx)[0] - hf_model(idx).logits).abs().max().item() < 1e-4


def test_import_reads_sharded_pytorch_bin(tmp_path):
    hf_model = random_hf_model(tmp_path / 'src')
    state = hf_model.state_dict()
    names = sorted(state)
    os.makedirs(tmp_path / 'bin')
    weight_map = {}
    for k, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        file = f'pytorch_model-0000{k + 1}-of-00002.bin'
        torch.save({n: state[n] for n in part}, tmp_path / 'bin' / file)
        weight_map.update({n: file for n in part})
    (tmp_path / 'bin' / 'pytorch_model.bin.index.json').write_text(json.dumps({'weight_map': weight_map}))
    (tmp_path / 'bin' / 'config.json').write_text((tmp_path / 'src' / 'config.json').read_text())
    model, _ = load_hf(str(tmp_path / 'bin'), tokenizer=False)
    idx = torch.arange(20)[None]
    with torch.no_grad():
        assert (model(idx)[0] - hf_model(idx).logits).abs().max().item() < 1e-4


def test_export_of_import_reproduces_the_tensors(tmp_path, sp_toks):
    random_hf_model(tmp_path / 'src')
    model, _ = load_hf(str(tmp_path / 'src'), tokenizer=False)
    save_checkpoint(str(tmp_path / 'out'), model, sp_toks['bpe'])
    export.export(str(tmp_path / 'out'), str(tmp_path / 'back'))
    original = safetensors_torch.load_file(str(tmp_path / 'src' / 'model.safetensors'))
    again = safetensors_torch.load_file(str(tmp_path / 'back' / 'model.safetensors'))
    assert sorted(original) == sorted(again)
    assert all(torch.equal(original[n], again[n]) for n in original)


def test_import_of_an_export_gives_back_model_and_tokenizer(tiny_export):
    dest, tok = tiny_export
    model, back = load_hf(dest)
    original, _, _ = load_model(os.path.join(os.path.dirname(dest), 'out'))
    assert all(torch.equal(a.to(torch.bfloat16).float(), b) for a, b in
               zip(original.state_dict().values(), model.state_dict().values()))
    assert [back.encode(t) for t in SAMPLES.values()] == [tok.encode(t) for t in SAMPLES.values()]


def test_import_without_tokenizer_model_says_how_to_load_weights_only(tmp_path):
    random_hf_model(tmp_path)
    with pytest.raises(FileNotFoundError, match='tokenizer=False'):
        load_hf(str(tmp_path))


@pytest.mark.parametrize('change,named', [
    ({'rope_scaling': {'rope_type': 'linear', 'factor': 2.0}}, 'rope_scaling'),
    ({'rope_parameters': {'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 8.0}}, 'rope_parameters'),
    ({'attention_bias': True}, 'attention_bias'),
    ({'mlp_bias': True}, 'mlp_bias'),
    ({'head_dim': 16}, 'head_dim'),
    ({'hidden_act': 'relu'}, 'hidden_act'),
    ({'model_type': 'mistral'}, 'model_type'),
])
def test_import_refuses_unsupported_config(tmp_path, change, named):
    config = {'model_type': 'llama', 'architectures': ['LlamaForCausalLM'], 'vocab_size': VOCAB, 'hidden_size': 32,
              'intermediate_size': 48, 'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,
              **change}
    (tmp_path / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ValueError, match=named):
        load_hf(str(tmp_path), tokenizer=False)


@pytest.mark.parametrize('change,named', [
    ({'rope_parameters': {'rope_type': 'default', 'rope_theta': '10000.0'}}, "'rope_parameters.rope_theta' is '10000.0'"),
    ({'rope_theta': '10000'}, "'rope_theta' is '10000'"),
    ({'tie_word_embeddings': 'false'}, "'tie_word_embeddings' is 'false', not true or false"),
    ({'rope_scaling': 'linear'}, "'rope_scaling' is 'linear', not an object"),
    ({'hidden_act': ['silu']}, "'hidden_act' is \\['silu'\\], not a string"),
    ({'eos_token_id': '2'}, "'eos_token_id' is '2'"),
])
def test_import_names_the_file_and_a_key_of_the_wrong_type(tmp_path, change, named):
    random_hf_model(tmp_path)
    path = tmp_path / 'config.json'
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError) as error:
        load_hf(str(tmp_path), tokenizer=False)
    assert str(error.value).startswith(f"{path}: ") and '\n' not in str(error.value)
    assert re.search(named, str(error.value))


def test_import_refuses_a_tensor_of_the_wrong_shape(tmp_path):
    random_hf_model(tmp_path)
    tensors = safetensors_torch.load_file(str(tmp_path / 'model.safetensors'))
    tensors['model.layers.1.mlp.up_proj.weight'] = torch.zeros(40, 32)
    safetensors_torch.save_file(tensors, str(tmp_path / 'model.safetensors'))
    with pytest.raises(ValueError, match=r'model.layers.1.mlp.up_proj.weight \(40, 32\)'):
        load_hf(str(tmp_path), tokenizer=False)


def test_import_refuses_missing_and_unexpected_tensors(tmp_path):
    random_hf_model(tmp_path)
    tensors = safetensors_torch.load_file(str(tmp_path / 'model.safetensors'))
    tensors['model.layers.0.self_attn.q_proj.bias'] = tensors.pop('model.norm.weight')
    safetensors_torch.save_file(tensors, str(tmp_path / 'model.safetensors'))
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\].*q_proj.bias"):
        load_hf(str(tmp_path), tokenizer=False)


def test_import_keeps_tokens_added_after_the_sentencepiece_vocab(tmp_path, sp_toks):
    config = transformers.LlamaConfig(vocab_size=VOCAB + 2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path))
    (tmp_path / 'tokenizer.model').write_bytes(sp_toks['bpe'].to_dict()['model_proto'])
    added = {str(VOCAB): {'content': '<instruction>', 'special': True},
             str(VOCAB + 1): {'content': '</instruction>', 'special': True}}
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'added_tokens_decoder': added}))
    _, tok = load_hf(str(tmp_path))
    ids = tok.encode('Pergunta: <instruction>Oi?</instruction> Olá')
    assert ids.count(VOCAB) == 1 and ids.count(VOCAB + 1) == 1
    assert tok.decode(ids) == 'Pergunta: <instruction>Oi?</instruction> Olá'


def test_load_model_reads_a_hugging_face_folder(tiny_export):
    dest, tok = tiny_export
    model, tokenizer, checkpoint = load_model(dest)
    same, _ = load_hf(dest)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    assert checkpoint['model_config'] == asdict(same.config)


def test_tokenizer_config_lists_the_chat_tokens_as_special_added_tokens(tiny_export):
    dest, tok = tiny_export
    config = json.load(open(os.path.join(dest, 'tokenizer_config.json'), encoding='utf-8'))
    added = {entry['content']: (int(i), entry['special']) for i, entry in config['added_tokens_decoder'].items()}
    for piece in ('<|im_start|>', '<|im_end|>'):
        assert added[piece] == (tok.token_to_id(piece), True)


# sample.py's greedy text on these prompts, set beside what transformers' text-generation pipeline
# makes of the export: a random model whose head is scaled to pick whole characters, often a word's
# start (the case transformers 5 got wrong: it decodes the new tokens alone and appends them)
GENERATION_PROMPTS = ['No princípio', 'Deus disse', 'a terra', 'Custa R$', 'Ação, coração,', 'Hapo mwanzo', 'x']


@pytest.mark.parametrize('kind', ['bpe', 'unigram', 'bytes', 'tiktoken'])
def test_text_generation_pipeline_gives_sample_py_greedy_text(sp_toks, tmp_path, kind):
    tok = sp_toks.get(kind) or (tiny_tiktoken(tmp_path) if kind == 'tiktoken' else load_tokenizer('bytes'))
    config = LlamaConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         ffn_hidden=48, tie_embeddings=False, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    model = sharp_model(config, seed=3)
    context = tok.encode('a', bos=True)
    with torch.no_grad():
        for i in range(tok.vocab_size):
            text = continuation_text(tok, context, [i])
            if i in tok.special_tokens.values() or not text.isprintable() or not text.strip() or '\ufffd' in text:
                model.output.weight[i] = 0
            elif text.startswith(' '):
                model.output.weight[i] *= 2.0
    save_checkpoint(str(tmp_path / 'out'), model, tok)
    export.export(str(tmp_path / 'out'), str(tmp_path / 'hf'))
    (tmp_path / 'prompts.txt').write_text('\n'.join(GENERATION_PROMPTS), encoding='utf-8')
    sample_main([f'--out_dir={tmp_path / "out"}', f'--start=FILE:{tmp_path / "prompts.txt"}', '--temperature=0',
                 '--max_new_tokens=8', '--format=jsonl', f'--output={tmp_path / "samples.jsonl"}', '--device=cpu'])
    records = [json.loads(line) for line in (tmp_path / 'samples.jsonl').read_text(encoding='utf-8').splitlines()]
    if tok.kind == 'sentencepiece':  # both cases: a first new token that starts a word and one that does not
        assert {r['text'].startswith(' ') for r in records} == {True, False}
    generator = transformers.pipeline('text-generation', model=str(tmp_path / 'hf'))
    for record in records:
        theirs = generator(record['prompt'], max_new_tokens=8, do_sample=False)[0]['generated_text']
        assert theirs == record['prompt'] + record['text']
