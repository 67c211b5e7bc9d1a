"""
Compare training runs at equal wall-clock: each run's val bits per byte at the minute the baseline
run finished, read from the runs' log.jsonl (`elapsed` and `val_bpb` of every evaluation). A run
that evaluated around that minute is interpolated linearly between its evaluations before and after;
one that finished earlier gives its final value.

    python tools/equal_time.py out/m27-adamw-pt-s1 out/m27-muon-pt-s1 [more runs ...]

The first run is the baseline. Prints, per run: its final step, minutes and val bpb, its val bpb
at the baseline's final minute, and how much lower than the baseline's final val bpb that is.
"""
import json
import os
import sys


def evaluations(out_dir):
    """[(elapsed seconds, step, val_bpb)] of a run's evaluations, in order."""
    path = os.path.join(out_dir, 'log.jsonl')
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise SystemExit(f"equal_time.py: {path} not found: give the out_dir of a training run")
    except json.JSONDecodeError as e:
        raise SystemExit(f"equal_time.py: {path}: not a training log ({e})")
    found = [(r['elapsed'], r['step'], r['val_bpb']) for r in records if r.get('val_bpb') is not None
             and r.get('elapsed') is not None]
    if not found:
        raise SystemExit(f"equal_time.py: {path} has no evaluation with val_bpb and elapsed")
    return found


def at_seconds(found, seconds):
    """val_bpb at `seconds` of elapsed time, linear between the evaluations around it (the last one after it)."""
    if seconds >= found[-1][0]:
        return found[-1][2]
    before = max((e for e in found if e[0] <= seconds), default=found[0])
    after = min(e for e in found if e[0] >= seconds)
    if after[0] == before[0]:
        return after[2]
    return before[2] + (after[2] - before[2]) * (seconds - before[0]) / (after[0] - before[0])


def main(argv):
    if len(argv) < 2 or any(a.startswith('-') for a in argv):
        raise SystemExit(__doc__.strip())
    runs = {out_dir: evaluations(out_dir) for out_dir in argv}
    baseline = runs[argv[0]]
    seconds, base_bpb = baseline[-1][0], baseline[-1][2]
    print(f"baseline {argv[0]}: step {baseline[-1][1]}, {seconds / 60:.2f} min, val bpb {base_bpb:.4f}")
    for out_dir, found in list(runs.items())[1:]:
        bpb = at_seconds(found, seconds)
        print(f"{out_dir}: step {found[-1][1]}, {found[-1][0] / 60:.2f} min, val bpb {found[-1][2]:.4f} "
              f"({relation(found[-1][2], base_bpb)}); at {seconds / 60:.2f} min {bpb:.4f} ({relation(bpb, base_bpb)})")


def relation(bpb, base_bpb):
    change = 100 * (1 - bpb / base_bpb)
    return f"{abs(change):.2f}% {'below' if change >= 0 else 'above'} the baseline's final"


if __name__ == '__main__':
    main(sys.argv[1:])
