"""
The table of data/biblia/demo.sh's runs: for the base model, SFT, DPO, the control and the classifier, the
held-out score as mean +- standard deviation over the seeds (and the range), beside the constant-answer
baseline, as exact match and as balanced accuracy; the paired McNemar tests of each seed (SFT against the
base model, DPO and the control against their SFT model, DPO against the control); the mean minutes a step took.

    python data/biblia/demo_table.py --out out/demo
"""

import glob
import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from mirim.answers import mcnemar  # noqa: E402
from mirim.configurator import settings  # noqa: E402


def spread(values):
    """'mean +- sd [min-max]' in percent (sd 0 for a single value)."""
    values = [100 * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):5.1f} +- {sd:4.1f} [{min(values):.1f}-{max(values):.1f}]"


def read_json(path):
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def table(out):
    seeds = sorted(int(m.group(1)) for m in (re.search(r'sft-(\d+)\.json$', p) for p in glob.glob(f'{out}/sft-*.json')) if m)
    if not seeds:
        sys.exit(f"error: no scored runs in {out} (sft-<seed>.json): run data/biblia/demo.sh first")
    times = {}
    if os.path.exists(f'{out}/times.tsv'):
        with open(f'{out}/times.tsv') as f:
            for line in f:
                name, seconds = line.split()
                times[name] = int(seconds)
    lines = [f"{len(seeds)} seed(s) {seeds}; percent of the held-out questions, mean +- sd [min-max]"]
    base = read_json(f'{out}/base.json') if os.path.exists(f'{out}/base.json') else None
    first = read_json(f'{out}/sft-{seeds[0]}.json')['after']
    lines.append(f"questions: {first['asked']}; constant answer {first['constant'][0]!r}: {100 * first['constant'][1]:.1f}% "
                 f"exact, balanced {100 * first['constant_balanced']:.1f}%")
    lines.append(f"{'model':<10} {'exact match':<26} {'balanced accuracy':<26} minutes")
    if base:
        lines.append(f"{'base':<10} {spread([base['after']['accuracy']]):<26} "
                     f"{spread([base['after']['balanced_accuracy']]):<26} {times.get('base-score', 0) / 60:.1f} (scoring)")
    tests = []
    for stage in ('sft', 'dpo', 'control'):
        results = {s: read_json(f'{out}/{stage}-{s}.json') for s in seeds if os.path.exists(f'{out}/{stage}-{s}.json')}
        if not results:
            continue
        minutes = [times[f'{stage}-{s}'] / 60 for s in results if f'{stage}-{s}' in times]
        lines.append(f"{stage:<10} {spread([r['after']['accuracy'] for r in results.values()]):<26} "
                     f"{spread([r['after']['balanced_accuracy'] for r in results.values()]):<26} "
                     f"{statistics.mean(minutes) if minutes else float('nan'):.1f} (training)")
        before = 'base' if stage == 'sft' else 'sft'
        for s, r in results.items():
            m = r.get('mcnemar')
            if m:
                tests.append(f"  seed {s} {stage} vs {before}: {m['right_only_after']} right only after, "
                             f"{m['right_only_before']} only before, p = {m['p']:.3g}")
    for s in seeds:
        paths = [f'{out}/{stage}-{s}.json' for stage in ('control', 'dpo')]
        if all(map(os.path.exists, paths)):
            control, dpo = (read_json(p) for p in paths)
            if control['prompts'] == dpo['prompts']:  # the same questions: a paired test
                b, c, p = mcnemar(control['after']['right'], dpo['after']['right'])
                tests.append(f"  seed {s} dpo vs control: {c} right only with DPO, {b} only with the control, p = {p:.3g}")
    classify = {s: read_json(f'{out}/classify-{s}/results.json') for s in seeds
                if os.path.exists(f'{out}/classify-{s}/results.json')}
    if classify:
        balanced = [statistics.mean(l['recall'] for l in r['per_label'] if l['support']) for r in classify.values()]
        minutes = [times[f'classify-{s}'] / 60 for s in classify if f'classify-{s}' in times]
        first = next(iter(classify.values()))
        lines.append(f"{'classifier':<10} {spread([r['accuracy'] for r in classify.values()]):<26} {spread(balanced):<26} "
                     f"{statistics.mean(minutes) if minutes else float('nan'):.1f} (training)   "
                     f"[{first['test_examples']} test verses, majority class {100 * first['majority_baseline']:.1f}%]")
    return lines + ['paired tests (McNemar, exact, two-sided):'] + tests


def main(argv=None):
    args = settings(dict(out='out/demo'), argv, help_source=__file__)  # out: the folder data/biblia/demo.sh wrote
    print('\n'.join(table(args.out)))


if __name__ == '__main__':
    main()
