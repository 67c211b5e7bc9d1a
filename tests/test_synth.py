"""data/synth.py and judge.py against a stub OpenAI endpoint on 127.0.0.1 (scripted failures: 429
with Retry-After, 500, invalid answers, timeouts, a bad key) and against serve.py itself."""
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import judge
from mirim import server as serve
from test_sample import ROOT, byte_tokenizer, program_model, save_checkpoint

sys.path.insert(0, os.path.join(ROOT, 'data'))
import synth  # noqa: E402


class Stub(ThreadingHTTPServer):
    """Answers each POST with the next scripted behaviour ('429', '500', 'garbage', 'slow', '401'),
    then with answer(prompt text) once the script is used up."""
    daemon_threads = True

    def __init__(self, answer, script=()):
        self.answer, self.script, self.lock, self.requests = answer, list(script), threading.Lock(), 0
        super().__init__(('127.0.0.1', 0), StubHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class StubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # /v1/models: the status the test set in server.models (200 lists one model)
        status = getattr(self.server, 'models', 200)
        self.reply(status, {'data': [{'id': 'stub-model'}]} if status == 200 else {'error': {'message': 'no'}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        with self.server.lock:
            self.server.requests += 1
            what = self.server.script.pop(0) if self.server.script else 'ok'
        if what == '429':
            return self.reply(429, {'error': {'message': 'slow down'}}, [('Retry-After', '0')])
        if what in ('500', '401'):
            return self.reply(int(what), {'error': {'message': what}})
        if what == 'slow':
            time.sleep(1.5)
        prompt = body['messages'][-1]['content']
        content = 'Sure! no JSON here' if what == 'garbage' else self.server.answer(prompt)
        self.reply(200, {'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': content},
                                      'finish_reason': 'stop'}]})


def story_answer(prompt):
    story = 'Título: O dia\n\n' + '**Era** uma vez ' + ' '.join(['palavra'] * 45) + '\n\n\n\n' + prompt
    return '```json\n' + json.dumps({'story': story}, ensure_ascii=False) + '\n```'


def lines(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def test_stories_retry_every_failure_and_come_out_unique_and_clean(tmp_path, capsys):
    stub = Stub(story_answer, ['429', '500', 'garbage', 'slow', '429'])
    out = str(tmp_path / 'stories.jsonl')
    synth.main(['--lang', os.path.join(ROOT, 'data/synth/pt'), '--n', '6', '--out', out, '--base_url', stub.url,
                '--model', 'm', '--concurrency', '3', '--backoff', '0.01', '--timeout', '1'])
    records = lines(out)
    assert len(records) == 6 and len({json.dumps(r['words'], sort_keys=True) for r in records}) == 6
    for r in records:
        assert set(r['words']) == {'noun', 'verb', 'adjective', 'feature'}
        assert r['text'].startswith('Era uma vez') and '**' not in r['text'] and '\n\n\n' not in r['text']
        assert r['words']['noun'] in r['text'] and r['words']['feature'] in r['text']
    err = capsys.readouterr().err
    assert 'http 429' in err and 'http 500' in err and 'rejected' in err and 'timeout' in err


def test_a_killed_run_resumes_without_duplicates(tmp_path):
    stub = Stub(story_answer)
    out = str(tmp_path / 'stories.jsonl')
    args = ['--lang', os.path.join(ROOT, 'data/synth/hi'), '--out', out, '--base_url', stub.url, '--model', 'm',
            '--concurrency', '2']
    synth.main(args + ['--n', '3'])
    first = lines(out)
    with open(out, 'a', encoding='utf-8') as f:
        f.write('{"text": "half a li')  # killed mid-write
    synth.main(args + ['--n', '7'])
    records = lines(out)
    assert len(records) == 7 and records[:3] == first
    assert len({json.dumps(r['words'], sort_keys=True) for r in records}) == 7
    requests = stub.requests
    synth.main(args + ['--n', '7'])  # nothing left to do
    assert stub.requests == requests and len(lines(out)) == 7
    # the same seed draws the same combinations as one uninterrupted run
    out2 = str(tmp_path / 'once.jsonl')
    synth.main(args[:2] + ['--out', out2] + args[4:] + ['--n', '7'])
    assert sorted(json.dumps(r['words'], sort_keys=True) for r in lines(out2)) == \
        sorted(json.dumps(r['words'], sort_keys=True) for r in records)


def test_a_bad_key_stops_the_run_with_one_line(tmp_path):
    stub = Stub(story_answer, ['401'] * 10)
    with pytest.raises(SystemExit) as e:
        synth.main(['--lang', os.path.join(ROOT, 'data/synth/pt'), '--n', '5', '--out', str(tmp_path / 'x.jsonl'),
                    '--base_url', stub.url, '--model', 'm', '--concurrency', '1'])
    assert '401' in str(e.value) and stub.requests == 1


def test_generic_prompts_against_serve_py(tmp_path, one_thread):
    tok = byte_tokenizer()
    model = program_model(tok, {ord('a'): ord('b'), ord('b'): ord('c'), ord('c'): ord('a')}, ord('a'))
    server = serve.build_server(save_checkpoint(tmp_path / 'abc', model, tok), port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        prompts = tmp_path / 'prompts.jsonl'
        prompts.write_text('{"prompt": "a"}\n{"prompt": "ca", "id": "x"}\n', encoding='utf-8')
        out = str(tmp_path / 'out.jsonl')
        synth.main(['--prompts', str(prompts), '--out', out, '--base_url',
                    f"http://127.0.0.1:{server.server_address[1]}/v1", '--chat', '0', '--max_tokens', '4',
                    '--temperature', '0'])
        records = lines(out)
        assert [(r['id'], r['completion']) for r in records] in ([(0, 'bcab'), ('x', 'bcab')],
                                                                 [('x', 'bcab'), (0, 'bcab')])
        assert records[0]['messages'][-1] == {'role': 'assistant', 'content': 'bcab'}
    finally:
        server.shutdown()
        server.server_close()


def test_judge_averages_scores_and_counts_unparseable_answers(tmp_path, capsys):
    def scores(prompt):
        n = 8 if 'bonita' in prompt else 4
        return json.dumps({c: n for c in judge.DEFAULTS['criteria'].split(',')})
    samples = tmp_path / 'a.jsonl'
    rows = [{'prompt_index': i, 'sample': 0, 'prompt': 'Era uma vez', 'text': t}
            for i, t in enumerate(['uma casa bonita', 'um gato', 'um cão'])]
    samples.write_text(''.join(json.dumps(r) + '\n' for r in rows), encoding='utf-8')
    # one story gets garbage until its retries are spent: stories are judged 1 at a time, in order
    stub = Stub(scores, ['garbage', 'garbage', 'garbage'])
    out = tmp_path / 'scores.json'
    results = judge.main([f'--samples={samples}', f'--base_url={stub.url}', '--model=j', '--retries=2', '--backoff=0.01',
                          '--concurrency=1', f'--output={out}'])
    r = results[str(samples)]
    assert r['stories'] == 3 and abs(r['unparseable'] - 1 / 3) < 1e-9
    assert r['criteria']['overall'] == {'mean': 4.0, 'se': 0.0}  # the 'bonita' story was the unparseable one
    assert 'unparseable 33.3%' in capsys.readouterr().out
    assert json.loads(out.read_text())['results'][str(samples)]['scores'][0]['scores'] is None
    assert judge.parse_scores('ok: {"context_awareness": "7", "completeness": 6, "grammar": 8, "fluency": 7, '
                              '"creativity": 5, "overall": 6}', ['grammar', 'context_awareness']) == \
        {'grammar': 8, 'context_awareness': 7}
    with pytest.raises(judge.Rejected):
        judge.parse_scores('{"grammar": 11}', ['grammar'])


def run_command(args):
    import subprocess
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, 'OPENAI_API_KEY': 'wrong'})


def samples_file(tmp_path, name='a.jsonl'):
    path = tmp_path / name
    path.write_text(json.dumps({'prompt_index': 0, 'sample': 0, 'prompt': 'Era', 'text': 'uma vez'}) + '\n')
    return path


@pytest.mark.parametrize('status', [401, 403])
def test_a_refused_key_at_the_model_lookup_is_one_line_naming_the_url(tmp_path, status):
    stub = Stub(story_answer)
    stub.models = status
    samples = samples_file(tmp_path)
    for args in (['judge.py', f'--samples={samples}', f'--base_url={stub.url}'],
                 ['data/synth.py', '--lang', 'data/synth/pt', '--n', '1', f'--base_url={stub.url}',
                  '--out', str(tmp_path / 'stories.jsonl')]):
        done = run_command(args)
        assert done.returncode == 1 and 'Traceback' not in done.stderr
        line, = done.stderr.strip().splitlines()
        assert f'{stub.url}/models answered {status}' in line and 'API key' in line
    assert stub.requests == 0  # no story was sent


def test_the_model_lookup_finds_the_first_listed_model(tmp_path):
    stub = Stub(lambda prompt: json.dumps({c: 5 for c in judge.DEFAULTS['criteria'].split(',')}))
    results = judge.main([f'--samples={samples_file(tmp_path)}', f'--base_url={stub.url}', '--backoff=0.01'])
    assert results[str(tmp_path / 'a.jsonl')]['criteria']['overall']['mean'] == 5


def test_judge_against_a_down_endpoint_exits_nonzero_naming_it(tmp_path):
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(('127.0.0.1', 0))
        url = f'http://127.0.0.1:{s.getsockname()[1]}/v1'
    for model in ('', 'j'):
        done = run_command(['judge.py', f'--samples={samples_file(tmp_path)}', f'--base_url={url}', f'--model={model}',
                            '--retries=0'])
        assert done.returncode == 1 and 'unparseable' not in done.stdout
        assert done.stderr.strip().splitlines() == [done.stderr.strip()] and f'cannot reach {url}' in done.stderr


@pytest.mark.parametrize('spelling', ['same', 'another path to it'])
def test_judge_refuses_one_samples_file_named_twice(tmp_path, spelling):
    samples = samples_file(tmp_path)
    second = samples if spelling == 'same' else os.path.relpath(samples, ROOT)
    with pytest.raises(ValueError, match='names .* twice'):
        judge.main([f'--samples={samples},{second}', '--base_url=http://127.0.0.1:9/v1', '--model=j'])
    done = run_command(['judge.py', f'--samples={samples},{second}', '--base_url=http://127.0.0.1:9/v1', '--model=j'])
    assert done.returncode == 1 and done.stderr.startswith('judge.py: error: --samples names')
