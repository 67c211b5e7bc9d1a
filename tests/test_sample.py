import io
import json
import os
import subprocess
import sys

import pytest
import torch

import sample
from mirim import sampling
from mirim.chat import CHAT_TEMPLATES
from mirim.common import resolve_dtype
from mirim.generate import generate
from model import Llama, LlamaConfig
from mirim.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ['No princípio', 'Era uma vez', 'a', 'O rato roeu a roupa do rei de Roma', 'Olá ☃']


def byte_tokenizer(chat_template=None):
    tok = load_tokenizer('bytes')  # 256 bytes, then <s> 256, </s> 257, <pad> 258, <|im_start|> 259, <|im_end|> 260
    tok.chat_template = chat_template
    return tok


def random_model(tok, block_size=96, seed=0):
    """A random tiny Llama whose weights are scaled up so its next-token choices are clear-cut
    (greedy comparisons then test the code, not float rounding between near-equal logits)."""
    config = LlamaConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2,
                         n_embd=64, ffn_hidden=128, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    model = Llama(config, seed=seed).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return model


def program_model(tok, next_token, default):
    """A Llama whose next token is a fixed function of the last token: every block adds nothing
    (wo = w2 = 0), token t embeds as one basis vector, and the head maps that vector to next_token[t]."""
    n_embd = 64
    config = LlamaConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=4, n_kv_head=4,
                         n_embd=n_embd, ffn_hidden=64, tie_embeddings=False, bos_id=tok.bos_id,
                         eos_id=tok.eos_id, pad_id=tok.pad_id)
    model = Llama(config, seed=0).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.zero_()
        model.tok_embeddings.weight[:, 0] = 1.0  # slot 0: every token not in next_token
        model.output.weight.zero_()
        model.output.weight[default, 0] = 10.0
        for slot, (token, following) in enumerate(next_token.items(), start=1):
            model.tok_embeddings.weight[token] = 0.0
            model.tok_embeddings.weight[token, slot] = 1.0
            model.output.weight[following, slot] = 10.0
    return model


def save_checkpoint(out_dir, model, tok, name='ckpt.pt'):
    """A checkpoint with the keys train.py writes (the contract in CONTEXT.md)."""
    os.makedirs(out_dir, exist_ok=True)
    from dataclasses import asdict
    torch.save({'model': model.state_dict(), 'model_config': asdict(model.config), 'config': {},
                'tokenizer': tok.to_dict(), 'step': 0, 'tokens_seen': 0, 'best_val_loss': None, 'val_loss': None,
                'val_bpb': None, 'optimizer': {}, 'scaler': {}, 'sampler': {}, 'rng': {}, 'data_dir': ''},
               os.path.join(out_dir, name))
    return str(out_dir)


@pytest.fixture(scope='module')
def tok():
    return byte_tokenizer()


@pytest.fixture(scope='module')
def model(tok):
    return random_model(tok)


@pytest.fixture(scope='module')
def out_dir(tmp_path_factory, model, tok):
    return save_checkpoint(tmp_path_factory.mktemp('run'), model, tok)


def run_cli(*args, stdin=''):
    return subprocess.run([sys.executable, 'sample.py', *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=60)


# ---------------------------------------------------------------- sampling

def test_same_seed_gives_same_samples_and_another_seed_differs(model, tok):
    run = lambda seed: sampling.sample_prompts(model, tok, PROMPTS[:2], num_samples=2, max_new_tokens=8,
                                             temperature=1.5, top_k=0, seed=seed, progress=False)
    first = run(7)
    assert first == run(7)
    assert [r['tokens'] for r in first] != [r['tokens'] for r in run(8)]


def test_greedy_sample_matches_model_generate(model, tok):
    [record] = sampling.sample_prompts(model, tok, ['Era uma vez'], max_new_tokens=20, temperature=0, progress=False)
    prompt = torch.tensor([tok.encode('Era uma vez', bos=True)])
    expected = generate(model, prompt, 20, temperature=0, eos_id=tok.eos_id)[0, prompt.size(1):].tolist()
    if tok.eos_id in expected:
        expected = expected[:expected.index(tok.eos_id)]
    assert record['tokens'] == expected


def test_batched_and_one_at_a_time_greedy_outputs_are_identical(model, tok):
    prompts = PROMPTS + ['', 'x' * 40]  # lengths 1 to 41 tokens: most rows are left-padded
    batched = sampling.sample_prompts(model, tok, prompts, max_new_tokens=10, temperature=0, batch_size=8,
                                    progress=False)
    single = sampling.sample_prompts(model, tok, prompts, max_new_tokens=10, temperature=0, batch_size=1,
                                   progress=False)
    assert [r['tokens'] for r in batched] == [r['tokens'] for r in single]


def test_sampling_stops_at_eos(tok):
    model = program_model(tok, {ord('i'): ord('A'), ord('A'): ord('B'), ord('B'): tok.eos_id}, default=ord('z'))
    [record] = sampling.sample_prompts(model, tok, ['hi'], max_new_tokens=10, progress=False)
    assert (record['text'], record['finish_reason']) == ('AB', 'eos')


def test_never_more_than_max_new_tokens(tok):
    model = program_model(tok, {}, default=ord('z'))  # never says eos
    records = sampling.sample_prompts(model, tok, PROMPTS, max_new_tokens=5, batch_size=2, progress=False)
    assert [len(r['tokens']) for r in records] == [5] * len(PROMPTS)
    assert all(r['finish_reason'] == 'length' for r in records)


def test_empty_prompt_starts_from_bos(tok):
    assert sampling.encode_prompt(tok, '', budget=10) == ([tok.bos_id], False)


def test_prompt_longer_than_context_is_cut_from_the_left_with_a_warning(model, tok, capsys):
    long_prompt = 'abcdefghij' * 20  # 200 tokens, context 96
    [record] = sampling.sample_prompts(model, tok, [long_prompt], max_new_tokens=8, temperature=0, progress=False)
    budget = sampling.prompt_budget(model.config.block_size, 8)
    kept = tok.encode(long_prompt, bos=True)[-budget:]
    expected = generate(model, torch.tensor([kept]), 8, temperature=0, eos_id=tok.eos_id)[0, budget:].tolist()
    if tok.eos_id in expected:
        expected = expected[:expected.index(tok.eos_id)]
    assert record['tokens'] == expected
    assert 'cut from the left' in capsys.readouterr().err


def test_stream_never_shows_a_replacement_character_for_a_split_character(tok):
    ids = tok.encode('olá ☃ 𝄞!')  # 2-, 3- and 4-byte characters, one byte per token
    pieces = list(sampling.decode_stream(tok, [tok.bos_id], ids))
    assert '\ufffd' not in ''.join(pieces)
    assert ''.join(pieces) == 'olá ☃ 𝄞!'


def test_float16_on_cpu_is_refused_with_advice():
    with pytest.raises(ValueError, match='bfloat16'):
        resolve_dtype('float16', 'cpu')


# ---------------------------------------------------------------- command line

def test_prompts_file_of_5_prompts_x_2_samples_gives_10_jsonl_records_that_decode_their_tokens(out_dir, tok, tmp_path,
                                                                                            capsys):
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('\n'.join(PROMPTS) + '\n', encoding='utf-8')
    sample.main([f'--out_dir={out_dir}', f'--start=FILE:{prompts}', '--num_samples=2', '--max_new_tokens=6',
                 '--format=jsonl', '--batch_size=4'])
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 10
    assert [(r['prompt'], r['sample']) for r in records] == [(p, j) for p in PROMPTS for j in range(2)]
    assert all(r['text'] == tok.decode(r['tokens']) and 'seed' in r for r in records)
    assert 'tokens/s' in err


def test_output_file_gets_the_records(out_dir, tmp_path, capsys):
    target = tmp_path / 'samples' / 'out.jsonl'
    sample.main([f'--out_dir={out_dir}', '--start=a', '--num_samples=3', '--max_new_tokens=4', '--format=jsonl',
                 f'--output={target}'])
    assert len(target.read_text(encoding='utf-8').splitlines()) == 3
    assert capsys.readouterr().out == ''


def test_streamed_single_prompt_is_repeatable_and_matches_batch_of_one(out_dir, model, tok, capsys):
    args = [f'--out_dir={out_dir}', '--start=Era uma vez', '--max_new_tokens=12', '--temperature=1.0', '--seed=5']
    sample.main(args)
    first = capsys.readouterr().out
    sample.main(args)
    assert capsys.readouterr().out == first
    [record] = sampling.sample_prompts(model, tok, ['Era uma vez'], max_new_tokens=12, temperature=1.0, seed=5,
                                     progress=False)
    assert first == 'Era uma vez' + record['text'] + '\n'


def test_missing_out_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        sample.main([f'--out_dir={tmp_path / "nope"}', '--start=a'])


def test_out_dir_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        sample.main([f'--out_dir={tmp_path}', '--start=a'])


def test_training_out_dir_without_best_pt_is_not_taken_for_a_hugging_face_folder(out_dir, tmp_path):
    # train.py writes config.json (its settings) into out_dir; a run stopped before its first
    # evaluation has ckpt.pt and no best.pt
    import shutil
    run = shutil.copytree(out_dir, tmp_path / 'run')
    (run / 'config.json').write_text(json.dumps({'out_dir': str(run), 'model': 'tiny'}))
    with pytest.raises(FileNotFoundError, match='no best.pt.*ckpt.pt.*--checkpoint'):
        sample.main([f'--out_dir={run}', '--checkpoint=best.pt', '--start=a'])


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / 'notes.txt').write_text('not a checkpoint')
    with pytest.raises(ValueError, match='not a mirim checkpoint'):
        sample.main([f'--out_dir={tmp_path / "notes.txt"}', '--start=a'])
    torch.save({'weights': torch.zeros(1)}, tmp_path / 'dict.pt')
    with pytest.raises(ValueError, match="lacks.*'model'"):
        sample.main([f'--out_dir={tmp_path / "dict.pt"}', '--start=a'])


def test_bad_flag_exits_nonzero_with_a_message_naming_it_and_no_traceback(out_dir):
    result = run_cli(f'--out_dir={out_dir}', '--temprature=0.5')
    assert result.returncode != 0
    assert 'temprature' in result.stderr and 'Traceback' not in result.stderr


def test_missing_checkpoint_exits_nonzero_with_a_message_and_no_traceback(tmp_path):
    result = run_cli(f'--out_dir={tmp_path}', '--start=a')
    assert result.returncode != 0
    assert 'no checkpoint' in result.stderr and 'Traceback' not in result.stderr


# ---------------------------------------------------------------- chat

def test_chat_answers_each_line_and_stops_at_the_end_token(tmp_path):
    tok = byte_tokenizer(CHAT_TEMPLATES['chatml'])
    # the generation prompt '<|im_start|>assistant\n' ends in '\n': answer 'Ok', then <|im_end|>, then
    # (should it not stop) 'z' forever
    im_end = tok.token_to_id('<|im_end|>')
    model = program_model(tok, {ord('\n'): ord('O'), ord('O'): ord('k'), ord('k'): im_end}, default=ord('z'))
    out_dir = save_checkpoint(tmp_path / 'chat', model, tok)
    result = run_cli(f'--out_dir={out_dir}', '--chat', '--max_new_tokens=20', stdin='Olá!\nTudo bem?\n')
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'Ok\nOk\n'
    assert result.stderr.splitlines()[-1].startswith('4 tokens')


def test_chat_with_the_aira_template_stops_at_eos(tok):
    model = program_model(tok, {ord('>'): ord('S'), ord('S'): ord('i'), ord('i'): ord('m'), ord('m'): tok.eos_id},
                          default=ord('z'))
    written = []
    lines = iter(['Oi?', '/exit', 'never read'])
    generated, _ = sampling.chat_loop(model, tok, 'aira', read=lambda prompt: next(lines), write=written.append,
                                    flush=lambda: None, max_new_tokens=10)
    assert (''.join(written), generated) == ('Sim\n', 3)


def test_chat_forgets_oldest_exchanges_to_fit_the_context(tok):
    messages = [{'role': 'system', 'content': 'S'}]
    for n in range(10):
        messages += [{'role': 'user', 'content': f'question {n}'}, {'role': 'assistant', 'content': f'answer {n}'}]
    messages.append({'role': 'user', 'content': 'last'})
    kept, ids = sampling.fit_history(messages, 'chatml', tok, budget=150)
    assert len(ids) <= 150
    assert kept[0] == messages[0] and kept[-1] == messages[-1] and kept[1]['role'] == 'user'
    assert len(kept) < len(messages)


def test_chat_without_a_template_is_a_clear_error(out_dir, monkeypatch):
    monkeypatch.setattr(sys, 'stdin', io.StringIO('hi\n'))
    with pytest.raises(ValueError, match='no chat template'):
        sample.main([f'--out_dir={out_dir}', '--chat=True'])


def test_no_progress_bar_lines_when_stderr_is_not_a_terminal(model, tok, capsys):
    sampling.sample_prompts(model, tok, PROMPTS[:3], max_new_tokens=4, temperature=0, batch_size=1)
    assert '%|' not in capsys.readouterr().err  # capsys's stderr is no terminal, like a log file
