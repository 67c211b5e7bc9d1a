"""
Synthetic training data from any OpenAI-compatible endpoint (vLLM, llama.cpp, OpenAI, serve.py).

Stories, as TinyStories-Regional makes them: every prompt fills a template with one word of each
list (noun, verb, adjective, feature...), each combination used once, and asks for a children's
story as a JSON object {"story": ...}; answers that are not such an object, or too short, are asked
for again; the story is cleaned with the language's regex rules.

    export OPENAI_API_KEY=...        # or --api_key_env=NAME; none for a local server
    python data/synth.py --lang data/synth/pt --n 1000 --out data/stories-pt.jsonl \
        --base_url http://127.0.0.1:8000/v1 --model qwen --concurrency 16
    python data/prepare.py --input data/stories-pt.jsonl --text_field text --tokenizer train:8192 --out data/stories-pt

A language folder holds prompt.txt (the template: {noun}, {verb}... name the lists; {{ }} are
literal braces), words.json ({"noun": [...], ...}) and optionally cleanup.json ([[regex,
replacement], ...], applied in order, multiline). data/synth/pt and data/synth/hi are examples.

Generic mode: a JSONL of prompts ({"prompt": ...} or {"messages": [...]}, optionally "id") ->
completions, e.g. chat fine-tuning data from a teacher model; each output record is the input
record plus "completion" and "messages" ending in the assistant's reply (data/prepare_chat.py reads it).

    python data/synth.py --prompts questions.jsonl --out answers.jsonl --base_url ... --model ...

Resumable: output records are appended one line at a time, and a rerun reads the output first and
skips every combination (or prompt id) already there, so a killed run continues where it stopped
and nothing is written twice; with the same --seed it draws the same combinations in the same order.
A half-written last line (a kill mid-write) is dropped. Combinations that failed every retry are
not written, and are tried again by the next run.

--out is a new file or this mode's own earlier output, which is resumed: appending to it replaces
nothing. Every line of it must be a record this mode writes (stories: an object with a "text" string and
a "words" object; generic: one with "id", "completion" and a "messages" list), a half-written last line
aside. Anything else (a checkpoint, another JSON file, the other mode's output, the --prompts file) is
refused before any request is sent, its bytes as they were, unless --overwrite: then it is replaced, once
the first record comes (a run that writes nothing leaves it). --overwrite never discards this mode's own
records: to start a run again, choose another --out (or remove the file). A folder is always refused.
"""
import contextlib
import itertools
import json
import os
import random
import re
import sys
import time

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from mirim.configurator import settings  # noqa: E402
from mirim.corpus import jsonl_records  # noqa: E402
from mirim.llm import Client, Fatal, Rejected, check_settings, run_all  # noqa: E402


# -----------------------------------------------------------------------------
# a language: template, word lists, cleanup rules

LANG_FOLDER = "a --lang folder holds prompt.txt, words.json and optionally cleanup.json, as data/synth/pt does"


def read_language_file(folder, name, kind):
    """The text (kind 'text') or JSON (kind 'json') of one file of a language folder; ValueError naming it."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: {LANG_FOLDER}")
    try:
        with open(path, encoding='utf-8') as f:
            return f.read() if kind == 'text' else json.load(f)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_language(folder):
    """(template, {slot: words}, cleanup rules) of a language folder; ValueError naming the file that is
    missing or not what it should be."""
    if not os.path.isdir(folder):
        raise ValueError(f"--lang {folder} is not a folder: {LANG_FOLDER}")
    template = read_language_file(folder, 'prompt.txt', 'text').strip()
    words = read_language_file(folder, 'words.json', 'json')
    if not isinstance(words, dict) or not all(isinstance(v, list) and all(isinstance(w, str) for w in v)
                                              for v in words.values()):
        raise ValueError(f"{folder}/words.json: not an object of word lists ({{\"noun\": [\"...\", ...], ...}})")
    slots = sorted(set(re.findall(r'(?<!\{)\{(\w+)\}(?!\})', template)))
    missing = [s for s in slots if not words.get(s)]
    if missing:
        raise ValueError(f"{folder}/prompt.txt uses {missing}, which words.json does not list")
    rules = []
    if os.path.exists(os.path.join(folder, 'cleanup.json')):
        path = os.path.join(folder, 'cleanup.json')
        pairs = read_language_file(folder, 'cleanup.json', 'json')
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                                                  for p in pairs):
            raise ValueError(f"{path}: not a list of [regex, replacement] pairs")
        try:
            rules = [(re.compile(pattern, re.MULTILINE), replacement) for pattern, replacement in pairs]
        except re.error as e:
            raise ValueError(f"{path}: a pattern is not a regular expression ({e})") from None
    return template, {s: words[s] for s in slots}, rules


def combinations(words, seed):
    """Every combination of one word per list, each once, in a random order fixed by seed. Drawn
    lazily (the product of a few lists of a few hundred words is too big to shuffle)."""
    slots = sorted(words)
    total = 1
    for s in slots:
        total *= len(words[s])
    rng, seen = random.Random(seed), set()
    while len(seen) < total:
        if len(seen) > total // 2 and len(seen) < total:  # nearly exhausted: list what is left
            rest = [c for c in itertools.product(*(range(len(words[s])) for s in slots)) if c not in seen]
            rng.shuffle(rest)
            for c in rest:
                yield {s: words[s][i] for s, i in zip(slots, c)}
            return
        c = tuple(rng.randrange(len(words[s])) for s in slots)
        if c not in seen:
            seen.add(c)
            yield {s: words[s][i] for s, i in zip(slots, c)}


def combo_key(combo):
    return json.dumps(combo, ensure_ascii=False, sort_keys=True)


def parse_story(text, rules, min_words):
    """The answer -> a clean story, or Rejected. Tolerates a ```json fence and text around the object."""
    text = re.sub(r'^\s*```(?:json)?\s*|\s*```\s*$', '', text.strip())
    start, end = text.find('{'), text.rfind('}')
    try:
        story = json.loads(text[start:end + 1])['story'] if start >= 0 else None
    except (ValueError, KeyError, TypeError):
        story = None
    if not isinstance(story, str):
        raise Rejected('not a JSON object with a "story" string')
    for pattern, replacement in rules:
        story = pattern.sub(replacement, story)
    story = story.strip()
    if len(story.split()) < min_words:
        raise Rejected(f'story of {len(story.split())} words (< {min_words})')
    return story


# -----------------------------------------------------------------------------
# the output file, read back for resuming

def is_story(record):
    """A record that stories mode writes."""
    return isinstance(record, dict) and isinstance(record.get('text'), str) and isinstance(record.get('words'), dict)


def is_completion(record):
    """A record that generic mode writes."""
    return isinstance(record, dict) and 'id' in record and 'completion' in record and \
        isinstance(record.get('messages'), list)


def read_output(path, is_record):
    """-> the records already in the output ([] for a new or empty file); NotOutput saying where the file is not
    such output (a line that is not JSON, or not is_record). A last line without its newline is a half-written
    record (a kill mid-write), dropped, when it starts as a JSON object and is not a whole other one."""
    if not os.path.exists(path):
        return []
    with open(path, 'rb') as f:
        data = f.read()
    good = data.rfind(b'\n') + 1
    try:
        lines = data[:good].decode('utf-8').split('\n')
    except UnicodeDecodeError:  # a checkpoint, an archive
        raise NotOutput(f"{path}: not UTF-8 text") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise NotOutput(f"{path}:{n}: not valid JSON") from None
        if not is_record(record):
            raise NotOutput(f"{path}:{n}: not a record of this mode")
        records.append(record)
    tail = data[good:]
    if tail.strip():
        try:
            last = json.loads(tail)
        except ValueError:
            last = None if tail.lstrip().startswith(b'{') else False  # a record cut short, or no JSON at all
        if last is False or (last is not None and not is_record(last)):
            raise NotOutput(f"{path}:{len(lines)}: not a record of this mode")
    return records


class NotOutput(ValueError):
    """A file that is not this mode's output; the message says where."""


def read_prompts(path):
    """The records of a --prompts file, through the one JSONL reader (file:line for a line that is not JSON);
    each must be an object with a "prompt" or "messages"."""
    prompts = []
    for where, record in jsonl_records(path, error=ValueError):
        if not isinstance(record, dict) or not ('prompt' in record or 'messages' in record):
            raise ValueError(f"{where}: not a prompt record: each line is an object with a \"prompt\" or "
                             f"\"messages\"")
        prompts.append(record)
    if not prompts:
        raise ValueError(f"{path} holds no prompts: one JSON object a line, with a \"prompt\" or \"messages\"")
    return prompts


def claim_output(path, is_record, overwrite, mode, prompts=None):
    """The rule of every command that writes (mirim/atomic.py), before a request is sent: -> (records already
    there, whether the file is to be replaced). This mode's own output is resumed (never replaced, even with
    overwrite); anything else is refused (ValueError, one line) unless overwrite; a half-written last line of
    our own output is cut off."""
    if os.path.isdir(path):
        raise ValueError(f"--out={path} is a directory: name a JSONL file in it")
    if prompts and os.path.exists(path) and os.path.samefile(path, prompts):
        raise ValueError(f"--out={path} is the --prompts file: name a new file for the completions")
    try:
        records = read_output(path, is_record)
    except NotOutput as e:
        if not overwrite:
            raise ValueError(f"{e}, so {path} is not an earlier output of synth.py's {mode} mode, which a rerun "
                             f"would continue: pass --overwrite to replace it, or choose another --out") from None
        return [], True
    if os.path.exists(path):
        with open(path, 'rb+') as f:
            good = f.read().rfind(b'\n') + 1
            f.truncate(good)
    return records, False


def run(jobs, work, out, total, concurrency, desc, replace=False):
    """Run jobs, append each result as one JSON line (replace: the first one replaces what out holds), show
    progress; -> (written, failed)."""
    written = failed = 0
    start = time.time()
    terminal = sys.stderr.isatty()
    bar = tqdm(total=total, desc=desc, unit='story', disable=not terminal)
    last_line = start
    with contextlib.ExitStack() as stack:
        f = None
        for job, result in run_all(jobs, work, concurrency):
            if isinstance(result, Exception):
                failed += 1
            else:
                if f is None:  # opened at the first record: a run that writes nothing leaves the file as it was
                    f = stack.enter_context(open(out, 'w' if replace else 'a', encoding='utf-8'))
                f.write(json.dumps(result, ensure_ascii=False) + '\n')
                f.flush()
                written += 1
                bar.update(1)
            rate = written / max(time.time() - start, 1e-9) * 60
            failures = work.client.failures
            bar.set_postfix_str(f"{rate:.0f}/min, failed {failed}, retried {sum(failures.values())}")
            if not terminal and time.time() - last_line > 30:  # a log gets a line, not a redrawn bar
                print(f"{desc}: {written}/{total}, {rate:.0f}/min, failed {failed}, retries {failures}",
                      file=sys.stderr)
                last_line = time.time()
    bar.close()
    return written, failed


# -----------------------------------------------------------------------------

DEFAULTS = dict(
    lang='',                  # a language folder (prompt.txt, words.json, cleanup.json): stories mode
    prompts='',               # a JSONL of prompts: generic mode
    out='',                   # output JSONL (appended to; a rerun resumes)
    n=100,                    # stories wanted in --out in all (stories mode)
    base_url='http://127.0.0.1:8000/v1',  # the OpenAI-compatible endpoint
    model='',                 # the endpoint's model name ('' = its first /v1/models entry)
    api_key_env='OPENAI_API_KEY',  # environment variable holding the API key
    chat=1,                   # 1: /chat/completions; 0: /completions with the raw prompt
    concurrency=8,            # requests in flight
    temperature=1.0,
    max_tokens=1024,
    retries=5,                # per prompt, after the first try
    backoff=1.0,              # seconds before the first retry; doubles each time
    timeout=120.0,            # seconds per request
    min_words=40,             # shorter stories are asked for again
    seed=1337,                # the order combinations are drawn in
    overwrite=False,          # replace an --out that is not this mode's earlier output (refused otherwise)
)


def main(argv=None):
    args = settings(DEFAULTS, argv, help_source=__file__, required=('out',))
    if bool(args.lang) == bool(args.prompts):
        sys.exit('synth.py: error: give --lang (stories) or --prompts (generic), not both')
    try:  # before the first request: a refused --out costs nothing
        check_settings(args.concurrency, args.timeout, args.retries, args.backoff, args.temperature, args.max_tokens)
        if args.n < 1 or args.min_words < 0:
            raise ValueError(f"--n={args.n}: must be >= 1" if args.n < 1 else f"--min_words={args.min_words}: must be >= 0")
        if args.lang:
            template, words, rules = load_language(args.lang)
            records, replace = claim_output(args.out, is_story, args.overwrite, 'stories')
        else:
            prompts = read_prompts(args.prompts)
            records, replace = claim_output(args.out, is_completion, args.overwrite, 'generic', args.prompts)
    except (ValueError, OSError) as e:
        sys.exit(f"synth.py: error: {e}")
    client = Client(args.base_url, args.model, os.environ.get(args.api_key_env, ''), args.timeout, args.retries,
                    args.backoff)
    if not client.model:
        try:
            client.model = client.default_model()
        except Fatal as e:
            sys.exit(f"synth.py: error: {e}")
    params = dict(chat=bool(args.chat), temperature=args.temperature, max_tokens=args.max_tokens)

    if args.lang:
        done = {combo_key(r['words']) for r in records}
        todo = max(0, args.n - len(done))
        jobs = itertools.islice((c for c in combinations(words, args.seed) if combo_key(c) not in done), todo)

        def work(combo):
            prompt = template.format(**combo)
            story = client.ask(prompt, check=lambda text: parse_story(text, rules, args.min_words), **params)
            return {'text': story, 'words': combo, 'model': client.model}
        desc = os.path.basename(os.path.normpath(args.lang))
    else:
        for n, r in enumerate(prompts):
            r.setdefault('id', n)
        done = {r['id'] for r in records}
        todo = sum(r['id'] not in done for r in prompts)
        jobs = (r for r in prompts if r['id'] not in done)

        def work(record):
            messages = record.get('messages')
            if messages is not None and not params['chat']:
                raise Fatal("records with 'messages' need --chat=1")
            completion = client.ask(record.get('prompt'), messages=messages, **params)
            asked = messages or [{'role': 'user', 'content': record['prompt']}]
            return {**record, 'completion': completion,
                    'messages': asked + [{'role': 'assistant', 'content': completion}]}
        desc = os.path.basename(args.prompts)
    work.client = client
    if done:
        print(f"{args.out}: {len(done)} records already there; {todo} to go", file=sys.stderr)
    try:
        written, failed = run(jobs, work, args.out, todo, args.concurrency, desc, replace)
    except Fatal as e:
        sys.exit(f"synth.py: error: {e}")
    print(f"wrote {written} records to {args.out} ({len(done) + written} in all); {failed} failed every retry "
          f"(a rerun tries them again); retried attempts: {client.failures or 'none'}", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
