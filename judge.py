"""
LLM-as-judge, as TinyStories-Regional evaluates its models: a large model behind any
OpenAI-compatible endpoint scores every story that sample.py wrote, 1-10 per criterion, and the
scores are averaged per model.

    python sample.py --out_dir=out/stories --start=FILE:eval_prompts.txt --num_samples=3 --format=jsonl --output=a.jsonl
    python judge.py --samples=a.jsonl,b.jsonl --base_url=http://127.0.0.1:8001/v1 --model=judge --output=scores.json

The rubric is an editable text file (data/judge/rubric.txt: {prompt} is the story's beginning,
{story} what the model wrote, {{ }} literal braces); the judge must answer with a JSON object holding an
integer 1-10 for every criterion. An answer that does not is asked for again (--retries); a story
still unscored after that counts as unparseable. Prints, per samples file, each criterion's mean +-
standard error and the share of unparseable answers; --output writes the same as JSON, with every
story's scores, for comparing models. --output names a new file: one already there (an earlier
judgement) is replaced only with --overwrite, and that is checked before any story is sent.
"""
import json
import math
import os
import re
import sys

from mirim.atomic import claim_file, write_json
from mirim.configurator import configure
from mirim.corpus import jsonl_records
from mirim.llm import Client, Fatal, Rejected, check_settings, run_all

# -----------------------------------------------------------------------------
# defaults; a config file or --key=value overrides them (configurator.py)
DEFAULTS = dict(
    samples='',               # sample.py --format=jsonl files, comma-separated: one model each
    rubric='data/judge/rubric.txt',  # the prompt sent for each story
    criteria='context_awareness,completeness,grammar,fluency,creativity,overall',  # the keys the judge must score
    base_url='http://127.0.0.1:8000/v1',  # the judge's OpenAI-compatible endpoint
    model='',                 # the judge's model name ('' = the endpoint's first /v1/models entry)
    api_key_env='OPENAI_API_KEY',  # environment variable holding the endpoint's API key
    concurrency=8,            # requests in flight
    temperature=0.0,
    max_tokens=200,
    retries=3,                # per story, after the first try (unparseable answers included)
    backoff=1.0,              # seconds before the first retry; doubles each time (a 429's Retry-After wins)
    timeout=120.0,            # seconds per request
    output='',                # write the summary and every story's scores to this JSON file
    overwrite=False,          # replace the --output file if it is already there (refused otherwise)
)


def parse_scores(text, criteria):
    """The judge's answer -> {criterion: int 1-10}, or Rejected."""
    match = re.search(r'\{.*\}', text, re.DOTALL)
    try:
        scores = json.loads(match.group(0)) if match else None
    except ValueError:
        scores = None
    if not isinstance(scores, dict):
        raise Rejected('no JSON object in the answer')
    out = {}
    for c in criteria:
        value = scores.get(c)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 10:
            raise Rejected(f'{c!r} is not a score from 1 to 10: {value!r}')
        out[c] = value
    return out


def mean_se(values):
    n = len(values)
    if not n:
        return None, None
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0
    return mean, se


def judge_file(client, path, rubric, criteria, concurrency, params):
    records = [record for _, record in jsonl_records(path, error=ValueError)]  # file:line for a line not JSON
    if not records or not all(isinstance(r, dict) and 'text' in r for r in records):
        raise ValueError(f"{path}: expected sample.py --format=jsonl records (with 'prompt' and 'text')")

    def work(n):
        prompt = rubric.format(prompt=records[n].get('prompt', ''), story=records[n]['text'])
        return client.ask(prompt, check=lambda text: parse_scores(text, criteria), **params)

    scored = {}
    for n, result in run_all(range(len(records)), work, concurrency):
        scored[n] = None if isinstance(result, Exception) else result
    stories = [{'prompt_index': r.get('prompt_index'), 'sample': r.get('sample'), 'scores': scored[n]}
               for n, r in enumerate(records)]
    good = [s['scores'] for s in stories if s['scores']]
    summary = {}
    for c in criteria:
        mean, se = mean_se([g[c] for g in good])
        summary[c] = {'mean': mean, 'se': se}
    return {'stories': len(records), 'unparseable': 1 - len(good) / len(records), 'criteria': summary,
            'scores': stories}


def main(argv):
    config = configure(DEFAULTS, argv, help_source=__file__)  # --help reads the comments in DEFAULTS
    files = [f for f in config['samples'].split(',') if f]
    if not files:
        raise ValueError("give --samples=FILE.jsonl[,FILE2.jsonl...] (sample.py --format=jsonl output)")
    seen = {}
    for f in files:  # the results are keyed by file: a second mention would overwrite the first
        if os.path.realpath(f) in seen:
            raise ValueError(f"--samples names {seen[os.path.realpath(f)]} twice (as {f} too): name each file once")
        seen[os.path.realpath(f)] = f
    if config['output']:  # refused before a story is judged, not after the work
        if os.path.abspath(config['output']) in map(os.path.abspath, files):
            raise ValueError(f"--output={config['output']} is one of --samples: name a new file for the scores")
        claim_file(config['output'], config['overwrite'], '--output')
    criteria = [c for c in config['criteria'].split(',') if c.strip()]
    if not criteria:
        raise ValueError("--criteria is empty: name the keys the judge scores, comma-separated")
    check_settings(config['concurrency'], config['timeout'], config['retries'], config['backoff'],
                   config['temperature'], config['max_tokens'])
    rubric_path = config['rubric']
    if not os.path.isabs(rubric_path) and not os.path.exists(rubric_path):  # the default, run from another folder
        rubric_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), rubric_path)
    with open(rubric_path if os.path.exists(rubric_path) else config['rubric'], encoding='utf-8') as f:
        rubric = f.read()
    client = Client(config['base_url'], config['model'], os.environ.get(config['api_key_env'], ''),
                    config['timeout'], config['retries'], config['backoff'])
    if not client.model:
        client.model = client.default_model()
    params = dict(temperature=config['temperature'], max_tokens=config['max_tokens'])
    results = {}
    for path in files:
        results[path] = judge_file(client, path, rubric, criteria, config['concurrency'], params)
        r = results[path]
        print(f"{path}: {r['stories']} stories, judged by {client.model}; unparseable {r['unparseable']:.1%}")
        for c in criteria:
            m = r['criteria'][c]
            print(f"  {c:<18} " + (f"{m['mean']:.2f} +- {m['se']:.2f}" if m['mean'] is not None else 'n/a'))
    if config['output']:
        write_json(config['output'], {'judge': client.model, 'rubric': config['rubric'], 'results': results})
        print(f"wrote {config['output']}", file=sys.stderr)
    return results


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except Fatal as e:
        sys.exit(f"judge.py: error: {e}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"judge.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
