"""tools/equal_time.py: runs compared at the minute the baseline finished, from their log.jsonl."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_log(out_dir, evaluations):
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, 'log.jsonl'), 'w') as f:
        for step, seconds, bpb in evaluations:
            f.write(json.dumps({'step': step, 'elapsed': seconds, 'val_bpb': bpb}) + '\n')
            f.write(json.dumps({'step': step, 'elapsed': seconds, 'train_loss': 1.0}) + '\n')  # not an evaluation


def equal_time(*out_dirs):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'equal_time.py'), *map(str, out_dirs)],
                          capture_output=True, text=True)


def test_a_slower_run_is_read_between_its_evaluations_around_the_baselines_last_minute(tmp_path):
    write_log(tmp_path / 'base', [(0, 5, 3.0), (100, 300, 2.0), (200, 600, 1.80)])
    write_log(tmp_path / 'slow', [(0, 5, 3.0), (100, 360, 1.9), (200, 720, 1.70)])  # 600 s: 2/3 of the way to 720
    write_log(tmp_path / 'fast', [(0, 5, 3.0), (200, 500, 1.98)])  # finished before: its final value
    result = equal_time(tmp_path / 'base', tmp_path / 'slow', tmp_path / 'fast')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith('step 200, 10.00 min, val bpb 1.8000')
    assert 'val bpb 1.7000 (5.56% below' in lines[1] and 'at 10.00 min 1.7667 (1.85% below' in lines[1]
    assert 'at 10.00 min 1.9800 (10.00% above' in lines[2]


def test_a_folder_without_a_training_log_is_one_line(tmp_path):
    write_log(tmp_path / 'base', [(0, 5, 3.0)])
    result = equal_time(tmp_path / 'base', tmp_path / 'missing')
    assert result.returncode == 1 and result.stderr.strip().endswith('not found: give the out_dir of a training run')
    os.makedirs(tmp_path / 'empty')
    open(tmp_path / 'empty' / 'log.jsonl', 'w').write('{"step": 0}\n')
    assert 'has no evaluation with val_bpb and elapsed' in equal_time(tmp_path / 'base', tmp_path / 'empty').stderr
