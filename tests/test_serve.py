"""serve.py as a real server on 127.0.0.1 (a free port), in a thread of this process: the openai
client where it is installed, raw http.client for what a client library hides (statuses, bodies)."""
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from mirim import sampling
from mirim import engine as serve_engine, server as serve
from test_sample import ROOT, byte_tokenizer, program_model, random_model, save_checkpoint

openai = pytest.importorskip('openai', reason='the openai client is not installed (requirements-dev.txt)')


def start(out_dir, **kwargs):
    server = serve.build_server(out_dir, port=0, quiet=True, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def url(server):
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope='module')
def tok():
    return byte_tokenizer('chatml')


@pytest.fixture(scope='module')
def model(tok):
    return random_model(tok)


@pytest.fixture(scope='module')
def server(tmp_path_factory, model, tok, one_thread):
    """A random tiny model with the ChatML template: its text is arbitrary bytes (split characters too)."""
    s = start(save_checkpoint(tmp_path_factory.mktemp('chat') / 'tiny-chat', model, tok))
    yield s
    s.shutdown()
    s.server_close()


@pytest.fixture(scope='module')
def abc_server(tmp_path_factory, one_thread):
    """A model that writes 'abc' over and over (a -> b -> c -> a), and has no chat template."""
    tok = byte_tokenizer()
    model = program_model(tok, {ord('a'): ord('b'), ord('b'): ord('c'), ord('c'): ord('a')}, ord('a'))
    s = start(save_checkpoint(tmp_path_factory.mktemp('abc') / 'abc', model, tok))
    yield s
    s.shutdown()
    s.server_close()


@pytest.fixture(scope='module')
def client(server):
    return openai.OpenAI(base_url=url(server) + '/v1', api_key='unused', max_retries=0)


def raw(server, method, path, body=None, headers=None):
    """-> (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, data, {'Content-Type': 'application/json', **(headers or {})})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


def test_models_lists_the_served_model(client, server):
    [card] = client.models.list().data
    assert card.id == 'tiny-chat' and card.max_model_len == 96
    assert raw(server, 'GET', '/v1/models/tiny-chat')[0] == 200


def test_greedy_completion_is_sample_py_greedy_text(client, model, tok):
    prompts = ['Era uma vez', 'No princípio', 'a']
    expected = sampling.sample_prompts(model, tok, prompts, max_new_tokens=20, temperature=0, progress=False)
    for prompt, record in zip(prompts, expected):
        r = client.completions.create(model='tiny-chat', prompt=prompt, max_tokens=20, temperature=0)
        assert r.choices[0].text == record['text']
        assert r.choices[0].finish_reason == ('stop' if record['finish_reason'] == 'eos' else 'length')
        assert r.usage.prompt_tokens == len(tok.encode(prompt, bos=True))
        assert r.usage.completion_tokens == len(record['tokens']) + (record['finish_reason'] == 'eos')


def test_streamed_chunks_join_to_the_whole_text(client):
    for prompt in ['Olá ☃', 'xyz']:
        whole = client.completions.create(model='tiny-chat', prompt=prompt, max_tokens=30, temperature=0)
        chunks = list(client.completions.create(model='tiny-chat', prompt=prompt, max_tokens=30, temperature=0,
                                                stream=True, stream_options={'include_usage': True}))
        assert ''.join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # n > 1 streams its choices interleaved (and merges what a slow reader missed): each joins up alike
    whole = client.completions.create(model='tiny-chat', prompt='Olá', max_tokens=30, temperature=0)
    texts = ['', '', '']
    for c in client.completions.create(model='tiny-chat', prompt='Olá', max_tokens=30, temperature=0, n=3,
                                       stream=True):
        texts[c.choices[0].index] += c.choices[0].text
        time.sleep(0.002)
    assert texts == [whole.choices[0].text] * 3
    messages = [{'role': 'system', 'content': 'Seja breve.'}, {'role': 'user', 'content': 'Oi!'}]
    whole = client.chat.completions.create(model='tiny-chat', messages=messages, max_tokens=25, temperature=0)
    chunks = list(client.chat.completions.create(model='tiny-chat', messages=messages, max_tokens=25,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == 'assistant'
    assert ''.join(c.choices[0].delta.content or '' for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_prompt_is_the_checkpoint_template(server, model, tok):
    from mirim.chat import chat_ids
    messages = [{'role': 'user', 'content': 'Oi!'}]
    status, r = raw(server, 'POST', '/v1/chat/completions', {'messages': messages, 'max_tokens': 5,
                                                            'temperature': 0})
    assert status == 200
    ids, _ = chat_ids(messages, 'chatml', tok, add_generation_prompt=True)
    assert r['usage']['prompt_tokens'] == len(ids)
    assert r['choices'][0]['message']['role'] == 'assistant'


def test_n_choices_seeds_and_usage(client):
    r = client.completions.create(model='tiny-chat', prompt=['ab', 'cde'], n=3, max_tokens=8, temperature=1.5,
                                  seed=5)
    assert [c.index for c in r.choices] == list(range(6))
    assert len({c.text for c in r.choices}) > 1  # sampled, not six copies
    again = client.completions.create(model='tiny-chat', prompt=['ab', 'cde'], n=3, max_tokens=8,
                                      temperature=1.5, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    assert r.usage.prompt_tokens == 3 + 4  # each prompt once, with its <bos>
    lengths = sum(c.finish_reason == 'length' for c in r.choices)
    assert 8 * lengths + 6 - lengths <= r.usage.completion_tokens <= 6 * 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stop_strings_cut_the_text_and_streaming_never_shows_them(abc_server):
    c = openai.OpenAI(base_url=url(abc_server) + '/v1', api_key='x', max_retries=0)
    r = c.completions.create(model='abc', prompt='a', max_tokens=20, temperature=0)
    assert r.choices[0].text.startswith('bcabcabc') and r.choices[0].finish_reason == 'length'
    r = c.completions.create(model='abc', prompt='a', max_tokens=20, temperature=0, stop=['xyz', 'cab'])
    assert r.choices[0].text == 'b' and r.choices[0].finish_reason == 'stop'
    assert r.usage.completion_tokens == 4  # b, c, a, b: the stop string was complete after the 4th
    chunks = list(c.completions.create(model='abc', prompt='a', max_tokens=20, temperature=0, stop='abca',
                                       stream=True))
    assert ''.join(ch.choices[0].text for ch in chunks) == 'bc'
    r = c.completions.create(model='abc', prompt='a', max_tokens=5, temperature=0, echo=True,
                             extra_body={'stop_token_ids': [ord('c')]})
    assert r.choices[0].text == 'ab' and r.choices[0].finish_reason == 'stop'  # echoed 'a', then 'b', then c
    r = c.completions.create(model='abc', prompt='a', max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == 'abcabc'


def test_errors_are_api_error_objects_with_their_status(server, abc_server, client):
    cases = [
        ('POST', '/v1/completions', {'prompt': 'a', 'temperature': -1}, 400, 'temperature'),
        ('POST', '/v1/completions', {'prompt': 'a', 'max_tokens': 0}, 400, 'max_tokens'),
        ('POST', '/v1/completions', {'prompt': 'a', 'top_p': 1.5}, 400, 'top_p'),
        ('POST', '/v1/completions', {'prompt': 'a', 'n': 'two'}, 400, 'n'),
        ('POST', '/v1/completions', {'prompt': 'a', 'stop': ['']}, 400, 'stop'),
        ('POST', '/v1/completions', {'prompt': 'a', 'presence_penalty': 1}, 400, 'presence_penalty'),
        ('POST', '/v1/completions', {'prompt': 42}, 400, 'prompt'),
        ('POST', '/v1/completions', {'prompt': [5, 999999]}, 400, 'prompt'),
        ('POST', '/v1/completions', {'prompt': 'a', 'model': 'gpt-4'}, 404, 'model'),
        ('POST', '/v1/completions', {'prompt': 'x' * 200}, 400, 'prompt'),
        ('POST', '/v1/completions', {'prompt': 'x' * 50, 'max_tokens': 60}, 400, 'max_tokens'),
        ('POST', '/v1/chat/completions', {'messages': [{'role': 'robot', 'content': 'hi'}]}, 400, 'messages'),
        ('POST', '/v1/chat/completions', {'messages': 'hi'}, 400, 'messages'),
        ('POST', '/v1/embeddings', {'input': 'a'}, 404, None),
        ('GET', '/v1/completions', None, 405, None),
        ('POST', '/v1/completions', b'{not json', 400, None),
    ]
    for method, path, body, status, param in cases:
        got, r = raw(server, method, path, body)
        assert got == status, (path, body, r)
        assert set(r['error']) == {'message', 'type', 'param', 'code'} and r['error']['param'] == param
    assert raw(server, 'POST', '/v1/completions', {'prompt': 'x' * 200})[1]['error']['code'] == \
        'context_length_exceeded'
    got, r = raw(abc_server, 'POST', '/v1/chat/completions', {'messages': [{'role': 'user', 'content': 'hi'}]})
    assert got == 400 and 'no chat template' in r['error']['message']
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model='tiny-chat', prompt='a', extra_body={'top_k': -5})
    # a body over the limit is refused from its Content-Length alone
    conn = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=30)
    conn.putrequest('POST', '/v1/completions')
    conn.putheader('Content-Length', str(serve.MAX_BODY + 1))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and 'error' in json.loads(response.read())
    conn.close()


def test_api_key(abc_server):
    abc_server.api_key = 'sesame'
    try:
        got, r = raw(abc_server, 'GET', '/v1/models')
        assert got == 401 and r['error']['code'] == 'invalid_api_key'
        assert raw(abc_server, 'GET', '/v1/models', headers={'Authorization': 'Bearer nope'})[0] == 401
        assert raw(abc_server, 'GET', '/v1/models', headers={'Authorization': 'Bearer sesame'})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url(abc_server) + '/v1', api_key='nope', max_retries=0).models.list()
        assert raw(abc_server, 'GET', '/')[0] == 200  # the page itself is public; its API calls send the key
    finally:
        abc_server.api_key = ''


def test_concurrent_requests_share_a_batch_and_give_one_at_a_time_text(server, client):
    prompts = ['Era uma vez', 'a', 'O rato roeu a roupa', 'Olá ☃']
    alone = [client.completions.create(model='tiny-chat', prompt=p, max_tokens=12, temperature=0).choices[0].text
             for p in prompts]
    engine = server.engine
    before = sum(engine.batch_sizes[i] == 4 for i in range(len(engine.batch_sizes)))
    engine.pause()
    results = [None] * 4

    def ask(i):
        results[i] = client.completions.create(model='tiny-chat', prompt=prompts[i], max_tokens=12,
                                               temperature=0).choices[0].text
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 20
    while engine.queued() < 4 and time.time() < deadline:
        time.sleep(0.01)
    engine.pause(False)
    for t in threads:
        t.join(30)
    assert results == alone
    assert sum(engine.batch_sizes[i] == 4 for i in range(len(engine.batch_sizes))) == before + 1
    status, stats = raw(server, 'GET', '/stats')
    assert status == 200 and stats['batch_sizes']['4'] >= 1 and stats['rows_per_step'] >= 1


def test_rows_that_arrive_during_a_batch_join_it_and_give_one_at_a_time_text(server, client, model, tok,
                                                                              monkeypatch):
    """A short prompt decodes 40 tokens; after a few steps a longer prompt (the running row moves right
    to make room) and a shorter one arrive and join the batch instead of waiting for it to end; when
    the long one leaves, the padding every row has is dropped. Each text is its greedy text alone,
    with and without the repetition penalty (which must not count the padding)."""
    engine = server.engine
    step_row = engine.step_row

    def slow_step(row, token):  # a slower model, so that the later requests surely arrive mid-batch
        time.sleep(0.004)
        step_row(row, token)
    monkeypatch.setattr(engine, 'step_row', slow_step)
    asks = [('a', 40), ('O rato roeu a roupa do rei', 20), ('xy', 12)]
    for penalty in (1.0, 1.3):
        expected = [sampling.sample_prompts(model, tok, [p], max_new_tokens=n, temperature=0, repetition_penalty=penalty,
                                          progress=False)[0]['text'] for p, n in asks]
        results, joined, steps = [None] * 3, engine.stats['joined'], engine.stats['steps']

        def ask(i):
            prompt, n = asks[i]
            results[i] = client.completions.create(model='tiny-chat', prompt=prompt, max_tokens=n, temperature=0,
                                                   extra_body={'repetition_penalty': penalty}).choices[0].text
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        threads[0].start()
        deadline = time.time() + 20
        while engine.stats['steps'] < steps + 3 and time.time() < deadline:
            time.sleep(0.001)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join(30)
        assert results == expected
        assert engine.stats['joined'] >= joined + 2


def stream(server, body, path='/v1/completions'):
    """A streamed request by hand -> (status, the data of each server-sent event, JSON parsed but [DONE])."""
    conn = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=30)
    conn.request('POST', path, json.dumps({**body, 'stream': True}).encode(), {'Content-Type': 'application/json'})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    if response.status != 200:
        return response.status, [json.loads(text)]
    return 200, [line[6:] if line == 'data: [DONE]' else json.loads(line[6:])
                 for line in text.split('\n') if line.startswith('data: ')]


def greedy(server, prompt, max_tokens=12):
    status, r = raw(server, 'POST', '/v1/completions', {'prompt': prompt, 'max_tokens': max_tokens, 'temperature': 0})
    assert status == 200, r
    return r['choices'][0]['text']


def test_bad_numbers_are_400s_that_name_them_and_the_engine_goes_on(server):
    """A seed torch.Generator cannot take once killed the engine thread (every later request hung);
    every number is now checked where parameters are read."""
    before = greedy(server, 'Era uma vez')
    cases = [('seed', 2 ** 64), ('seed', -1), ('seed', 1.5), ('seed', '5'), ('seed', 5.0), ('seed', True),
             ('temperature', float('nan')), ('temperature', float('inf')), ('temperature', 10 ** 400),
             ('top_p', float('nan')), ('repetition_penalty', float('-inf')), ('repetition_penalty', float('nan')),
             ('presence_penalty', float('nan')), ('frequency_penalty', float('inf')), ('max_tokens', float('inf')),
             ('n', float('nan')), ('top_k', float('nan'))]
    for name, value in cases:
        got, r = raw(server, 'POST', '/v1/completions', {'prompt': 'a', 'max_tokens': 3, 'temperature': 1,
                                                         name: value})
        assert got == 400 and r['error']['param'] == name, (name, value, r)
        assert len(r['error']['message']) < 200  # 10**400 is not echoed whole
    status, r = raw(server, 'POST', '/v1/chat/completions', {'messages': [{'role': 'user', 'content': 'Oi'}],
                                                             'seed': 2 ** 64, 'temperature': 1})
    assert status == 400 and r['error']['param'] == 'seed'
    assert stream(server, {'prompt': 'a', 'seed': -1})[0] == 400
    # the largest seed works, for every choice (seed + choice wraps around), and reproducibly
    body = {'prompt': 'a', 'max_tokens': 6, 'temperature': 1.5, 'n': 3, 'seed': 2 ** 64 - 1}
    status, r = raw(server, 'POST', '/v1/completions', body)
    assert status == 200 and len(r['choices']) == 3
    assert [c['text'] for c in raw(server, 'POST', '/v1/completions', body)[1]['choices']] == \
        [c['text'] for c in r['choices']]
    # a temperature too small to divide by is greedy (as in vLLM), not a NaN in the sampler
    status, r = raw(server, 'POST', '/v1/completions', {'prompt': 'Era uma vez', 'max_tokens': 12,
                                                        'temperature': 1e-300})
    assert status == 200 and r['choices'][0]['text'] == before
    assert greedy(server, 'Era uma vez') == before
    assert raw(server, 'GET', '/health') == (200, {'status': 'ok'})


BAD = 'Quoth the raven'  # the bad request's prompt: the faults below raise for rows that hold a Q
Q = ord('Q')             # (the byte tokenizer's id of 'Q'; the good request's text has none)


@pytest.mark.parametrize('where', ['prefill', 'sample_rows', 'step_row'])
def test_a_request_that_raises_in_the_engine_fails_alone(where, server, monkeypatch):
    """A fault while one request's rows are prefilled, sampled or stepped fails that request (a 500
    error object; a stream gets it as an event, then its end) and not the request it shares the
    batch with; the engine goes on."""
    engine = server.engine
    good, long = greedy(server, 'Era uma vez'), greedy(server, 'a', 40)
    assert 'Q' not in good + long
    faulty = {'prefill': lambda model, idx, left_pad=None: (idx == Q).any(),
              'sample_rows': lambda logits, seen, **knobs: (seen == Q).any(),
              'step_row': lambda row, token: Q in row.ids}[where]
    owner = engine if where == 'step_row' else serve_engine
    real = getattr(owner, where)

    def fault(*args, **kwargs):
        if faulty(*args, **kwargs):
            raise RuntimeError(f'injected fault in {where}')
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, where, fault)
    results = {}

    def ask(name, prompt, max_tokens=12):
        results[name] = raw(server, 'POST', '/v1/completions', {'prompt': prompt, 'max_tokens': max_tokens,
                                                                'temperature': 0})
    threads = [threading.Thread(target=ask, args=args) for args in (('bad', BAD), ('good', 'Era uma vez'))]
    engine.pause()
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while engine.queued() < 2 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        engine.pause(False)
    for t in threads:
        t.join(30)
    assert engine.batch_sizes[-1] == 2  # they shared the batch
    assert results['good'][0] == 200 and results['good'][1]['choices'][0]['text'] == good
    status, r = results['bad']
    assert status == 500 and r['error']['type'] == 'server_error'
    assert f'injected fault in {where}' in r['error']['message']
    status, events = stream(server, {'prompt': BAD, 'max_tokens': 12, 'temperature': 0})
    assert status == 200 and events[-1] == '[DONE]'
    assert f'injected fault in {where}' in events[-2]['error']['message']
    # the bad request joins a running batch (its longer prompt would move the running row right): the
    # running request goes on as if it had not come
    inner = engine.step_row

    def slow_step(row, token):
        time.sleep(0.01)
        inner(row, token)
    monkeypatch.setattr(engine, 'step_row', slow_step)
    steps, joined = engine.stats['steps'], engine.stats['joined']
    runner = threading.Thread(target=ask, args=('long', 'a'), kwargs={'max_tokens': 40})
    runner.start()
    deadline = time.time() + 20
    while engine.stats['steps'] < steps + 3 and time.time() < deadline:
        time.sleep(0.001)
    status, r = raw(server, 'POST', '/v1/completions', {'prompt': BAD, 'max_tokens': 12, 'temperature': 0})
    runner.join(30)
    assert status == 500 and f'injected fault in {where}' in r['error']['message']
    assert engine.stats['joined'] == joined + 1
    assert results['long'][0] == 200 and results['long'][1]['choices'][0]['text'] == long
    monkeypatch.undo()
    assert greedy(server, 'Era uma vez') == good
    assert raw(server, 'GET', '/health')[0] == 200


def test_a_failed_forward_step_fails_its_batch_and_the_engine_goes_on(server, monkeypatch):
    good = greedy(server, 'xyz', 8)
    real, calls = serve_engine.decode_one_token, []

    def once(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError('injected forward fault')
        return real(*args)
    monkeypatch.setattr(serve_engine, 'decode_one_token', once)
    status, r = raw(server, 'POST', '/v1/completions', {'prompt': 'xyz', 'max_tokens': 8, 'temperature': 0})
    assert status == 500 and 'injected forward fault' in r['error']['message']
    assert greedy(server, 'xyz', 8) == good  # the cache and the one-row weight layout were let go


def test_a_stopped_engine_is_reported_and_refuses_requests(tmp_path, model, tok, one_thread):
    """Should the engine thread stop (a bug), /health says so and requests get a 503 at once, those
    already waiting too, instead of hanging."""
    s = start(save_checkpoint(tmp_path / 'doomed', model, tok))
    engine = s.engine
    body = {'prompt': 'a', 'max_tokens': 3, 'temperature': 0}
    try:
        assert raw(s, 'GET', '/health') == (200, {'status': 'ok'})
        # a thread that ended without a word: a waiting request notices within a second
        engine.pause()
        result = []
        asker = threading.Thread(target=lambda: result.append(raw(s, 'POST', '/v1/completions', body)))
        asker.start()
        deadline = time.time() + 20
        while engine.queued() < 1 and time.time() < deadline:
            time.sleep(0.01)
        thread, engine.thread = engine.thread, threading.Thread(target=lambda: None)
        engine.thread.start()
        engine.thread.join()
        asker.join(10)
        assert result and result[0][0] == 503 and 'not running' in result[0][1]['error']['message']
        status, r = raw(s, 'GET', '/health')
        assert status == 503 and r['status'] == 'error' and 'not running' in r['reason']
        engine.thread = thread
        engine.pause(False)
        assert raw(s, 'GET', '/health')[0] == 200 and raw(s, 'POST', '/v1/completions', body)[0] == 200
        # a bug outside the per-request handling stops the thread: the request it met fails with a 503
        def broken(batch):
            raise RuntimeError('injected engine bug')
        engine.take_rows = broken
        status, r = raw(s, 'POST', '/v1/completions', body)
        assert status == 503 and 'injected engine bug' in r['error']['message']
        engine.thread.join(10)
        assert not engine.thread.is_alive()
        status, r = raw(s, 'GET', '/health')
        assert status == 503 and 'injected engine bug' in r['reason']
        chat = {'messages': [{'role': 'user', 'content': 'Oi'}]}
        for request in (lambda: raw(s, 'POST', '/v1/completions', body), lambda: stream(s, body),
                        lambda: raw(s, 'POST', '/v1/chat/completions', chat)):
            started = time.time()
            status, r = request()
            assert status == 503 and time.time() - started < 5
    finally:
        engine.pause(False)
        s.shutdown()
        s.server_close()


def test_chat_page_is_served(server):
    status, html = raw(server, 'GET', '/')
    assert status == 200 and '/v1/chat/completions' in html and 'stream: true' in html


CHROMIUM = '/usr/bin/chromium'


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (Debian: apt-get install chromium)")
def test_chat_page_streams_a_reply_in_headless_chromium(server, tmp_path):
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed')
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
        page = browser.new_page()
        page.goto(url(server) + '/')
        page.fill('#temperature', '0')
        page.fill('#max_tokens', '20')
        page.fill('#input', 'Oi!')
        page.press('#input', 'Enter')
        page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 1 && "
                               "document.querySelector('.msg.assistant').textContent.length > 0", timeout=20000)
        page.wait_for_function("!document.querySelector('.note')", timeout=1000)
        assert page.inner_text('.msg.user') == 'Oi!'
        page.screenshot(path=str(tmp_path / 'chat.png'))
        page.fill('#input', '/reset')
        page.press('#input', 'Enter')
        assert page.eval_on_selector_all('.msg', 'els => els.length') == 0
        browser.close()


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (Debian: apt-get install chromium)")
def test_chat_page_asks_with_its_key_and_keeps_its_history_when_a_message_does_not_fit(server):
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed')
    server.api_key = 'k2'
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
            page = browser.new_page()
            page.goto(url(server) + '/')
            page.wait_for_function("document.querySelector('#model').textContent.includes('API key')", timeout=10000)
            page.fill('#key', 'k2')
            page.dispatch_event('#key', 'change')
            page.wait_for_function("document.querySelector('#model').textContent == 'tiny-chat'", timeout=10000)
            page.fill('#temperature', '0')
            page.fill('#max_tokens', '5')
            page.fill('#input', 'Oi!')
            page.press('#input', 'Enter')
            page.wait_for_function("messages.length == 2", timeout=20000)
            page.fill('#input', 'x' * 400)  # alone over the model's context: an error, the history stays
            page.press('#input', 'Enter')
            page.wait_for_function("document.querySelector('.note') && !busy", timeout=20000)
            assert 'error' in page.inner_text('.note')
            assert page.evaluate("messages.map(m => m.role)") == ['user', 'assistant']
            browser.close()
    finally:
        server.api_key = ''


def test_command_line_serves_with_a_key_from_the_environment(tmp_path, model, tok):
    out_dir = save_checkpoint(tmp_path / 'cli', model, tok)
    env = {**os.environ, 'MIRIM_API_KEY': 'k1'}
    proc = subprocess.Popen([sys.executable, 'serve.py', f'--out_dir={out_dir}', '--port=0', '--device=cpu',
                             '--quiet'], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert 'serving cli' in line, line
        port = int(line.split('http://127.0.0.1:')[1].split()[0])
        c = openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='k1', max_retries=0)
        expected = sampling.sample_prompts(model, tok, ['a'], max_new_tokens=3, temperature=0, progress=False)[0]
        # greedy, so the answer is known (a sampled one may end at eos before 3 tokens)
        assert c.completions.create(model='cli', prompt='a', max_tokens=3, temperature=0).choices[0].text == expected['text']
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_port_that_cannot_be_used_is_one_line_naming_it(server, tmp_path, model, tok):
    out = save_checkpoint(tmp_path / 'm', model, tok)
    host, port = server.server_address[:2]  # taken by the running test server
    with pytest.raises(OSError, match=f'cannot listen on {host}:{port}'):
        serve.build_server(out, host=host, port=port, quiet=True)
    for port in (70000, -1):
        process = subprocess.run([sys.executable, os.path.join(ROOT, 'serve.py'), f'--out_dir={out}', f'--port={port}'],
                                 cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert process.returncode != 0 and 'Traceback' not in process.stderr and f'port={port}' in process.stderr


def test_limits_where_one_request_costs_everyone_are_400s_that_name_them(server):
    """Issue #25: 100,000 stop strings (checked at every token in the shared engine thread), 2,000 prompts
    x n=128 rows, or a chat of thousands of messages are refused at once, naming the parameter and limit."""
    before = greedy(server, 'Era uma vez')
    post = lambda path, body: raw(server, 'POST', path, body)  # noqa: E731
    cases = [('/v1/completions', {'prompt': 'a', 'max_tokens': 2, 'stop': ['x'] * (serve.MAX_STOPS + 1)},
              'stop', str(serve.MAX_STOPS)),
             ('/v1/completions', {'prompt': 'a', 'max_tokens': 2, 'stop': 'x' * (serve.MAX_STOP_CHARS + 1)},
              'stop', str(serve.MAX_STOP_CHARS)),
             ('/v1/completions', {'prompt': ['a'] * 2000, 'max_tokens': 2, 'n': 128}, 'n', str(serve.MAX_ROWS)),
             ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': 'Oi'}] * (serve.MAX_MESSAGES + 1),
                                       'max_tokens': 2}, 'messages', str(serve.MAX_MESSAGES))]
    for path, body, param, limit in cases:
        start_time = time.perf_counter()
        status, r = post(path, body)
        assert status == 400 and r['error']['param'] == param and limit in r['error']['message'], r
        assert time.perf_counter() - start_time < 5
    # just under each limit is served
    status, r = post('/v1/completions', {'prompt': 'a', 'max_tokens': 2, 'temperature': 0,
                                         'stop': ['x' * serve.MAX_STOP_CHARS] * serve.MAX_STOPS})
    assert status == 200, r
    status, r = post('/v1/completions', {'prompt': ['a'] * 2, 'max_tokens': 1, 'n': serve.MAX_ROWS // 2})
    assert status == 200 and len(r['choices']) == serve.MAX_ROWS, r
    # MAX_MESSAGES messages pass the message cap (this tiny model's context is what refuses them), fast
    start_time = time.perf_counter()
    status, r = post('/v1/chat/completions', {'messages': [{'role': 'user', 'content': 'Oi'}] * serve.MAX_MESSAGES,
                                              'max_tokens': 2})
    assert time.perf_counter() - start_time < 5
    assert status == 200 or r['error']['code'] == 'context_length_exceeded', r
    assert greedy(server, 'Era uma vez') == before


# -----------------------------------------------------------------------------
# the HTTP layer (Starlette under uvicorn), tried with raw sockets where a client library would refuse

def send_raw(server, data, wait=5):
    """Send bytes as they are; -> what came back before the server closed or wait seconds passed."""
    s = socket.create_connection(('127.0.0.1', server.server_address[1]))
    s.settimeout(wait)
    s.sendall(data)
    out = b''
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except socket.timeout:
        pass
    s.close()
    return out


def status_of(reply):
    return int(reply.split(b' ', 2)[1]) if reply.startswith(b'HTTP/1.1 ') else None


POST = b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n'
BODY = json.dumps({'prompt': 'ab', 'max_tokens': 3, 'temperature': 0}).encode()


def test_malformed_http_is_refused_by_the_server_and_odd_but_valid_http_works(server):
    for length in (b'-1', b'abc', b'1e3'):  # once: read until the client closed, or a traceback and no reply
        start = time.time()
        assert status_of(send_raw(server, POST + b'Content-Length: ' + length + b'\r\n\r\n' + BODY)) == 400
        assert time.time() - start < 3
    two = POST + b'Content-Length: %d\r\nContent-Length: 5\r\n\r\n' % len(BODY) + BODY
    assert status_of(send_raw(server, two)) == 400
    chunked = POST + b'Transfer-Encoding: chunked\r\n\r\n' + b'%x\r\n' % len(BODY) + BODY + b'\r\n0\r\n\r\n'
    reply = send_raw(server, chunked)  # once read as an empty body
    assert status_of(reply) == 200 and b'"text_completion"' in reply
    assert status_of(send_raw(server, b'HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n')) == 200
    reply = send_raw(server, b'OPTIONS /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n')
    assert status_of(reply) == 405 and b'"error"' in reply


def test_a_body_that_never_ends_is_a_408_and_holds_no_thread(server):
    server.body_seconds = 1
    try:
        threads = threading.active_count()
        held = [socket.create_connection(('127.0.0.1', server.server_address[1])) for _ in range(50)]
        for s in held:  # headers promise 10 more bytes than come
            s.sendall(POST.replace(b'Connection: close\r\n', b'') + b'Content-Length: %d\r\n\r\n' % (len(BODY) + 10)
                      + BODY)
        assert threading.active_count() <= threads + 2  # no thread per connection
        held[0].settimeout(10)
        assert status_of(held[0].recv(65536)) == 408
        for s in held:
            s.close()
        assert greedy(server, 'ab', 3)  # the server goes on
    finally:
        server.body_seconds = serve.BODY_SECONDS


def test_requests_from_other_sites_and_dns_rebinding_are_refused(server):
    port = server.server_address[1]
    got, r = raw(server, 'GET', '/v1/models', headers={'Host': f'attacker.example:{port}'})
    assert got == 403 and 'DNS rebinding' in r['error']['message']
    for origin in ('http://attacker.example', 'null', f'http://127.0.0.1:{port + 1}'):
        got, r = raw(server, 'POST', '/v1/completions', BODY, headers={'Origin': origin})
        assert got == 403 and 'another site' in r['error']['message'], origin
    assert raw(server, 'POST', '/v1/completions', BODY, headers={'Origin': f'http://127.0.0.1:{port}'})[0] == 200
    assert raw(server, 'POST', '/v1/completions', BODY, headers={'Origin': f'http://localhost:{port}',
                                                                  'Host': f'localhost:{port}'})[0] == 200
    # a page's form or text/plain fetch needs no CORS handshake: refused by its Content-Type
    for kind in ('text/plain', 'application/x-www-form-urlencoded'):
        got, r = raw(server, 'POST', '/v1/completions', BODY, headers={'Content-Type': kind})
        assert got == 415 and 'application/json' in r['error']['message']


def test_allow_origin_lets_one_page_in_with_cors(tmp_path, model, tok):
    s = start(save_checkpoint(tmp_path / 'm', model, tok), allow_origin=['http://localhost:5173'])
    try:
        conn = http.client.HTTPConnection('127.0.0.1', s.server_address[1], timeout=30)
        conn.request('OPTIONS', '/v1/completions', headers={
            'Origin': 'http://localhost:5173', 'Access-Control-Request-Method': 'POST',
            'Access-Control-Request-Headers': 'content-type'})
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        assert response.getheader('access-control-allow-origin') == 'http://localhost:5173'
        got, r = raw(s, 'POST', '/v1/completions', BODY, headers={'Origin': 'http://localhost:5173'})
        assert got == 200
        assert raw(s, 'POST', '/v1/completions', BODY, headers={'Origin': 'http://localhost:5174'})[0] == 403
    finally:
        s.shutdown()
        s.server_close()


def test_the_key_guards_every_route_but_health_and_the_page(abc_server):
    abc_server.api_key = 'sesame'
    try:
        assert raw(abc_server, 'GET', '/stats')[0] == 401
        assert raw(abc_server, 'GET', '/v1/models/abc')[0] == 401
        assert raw(abc_server, 'GET', '/health')[0] == 200
        for header in ('bearer sesame', 'BEARER  sesame ', 'Bearer sesame'):  # the scheme is case-insensitive
            assert raw(abc_server, 'GET', '/stats', headers={'Authorization': header})[0] == 200, header
        assert raw(abc_server, 'GET', '/stats', headers={'Authorization': 'Basic sesame'})[0] == 401
    finally:
        abc_server.api_key = ''


def test_text_that_is_no_text_and_odd_parts_are_400s(server):
    cases = [({'prompt': '\ud800abc'}, '/v1/completions', 'prompt'),
             ({'prompt': ['ok', 'x\udfffy']}, '/v1/completions', 'prompt'),
             ({'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 5}]}]}, '/v1/chat/completions',
              'messages'),
             ({'messages': [{'role': 'user', 'content': {'text': 'hi'}}]}, '/v1/chat/completions', 'messages'),
             ({'messages': [{'role': 7, 'content': 'hi'}]}, '/v1/chat/completions', 'messages'),
             ({'messages': [{'role': 'user', 'content': '\udc80'}]}, '/v1/chat/completions', 'messages'),
             ({'prompt': 'a', 'repetition_penalty': 1e-300}, '/v1/completions', 'repetition_penalty'),
             ({'prompt': 'a', 'repetition_penalty': 1e300}, '/v1/completions', 'repetition_penalty'),
             ({'prompt': 'a', 'tools': [{'type': 'function'}]}, '/v1/completions', 'tools'),
             ({'prompt': 'a', 'logprobs': 6}, '/v1/completions', 'logprobs'),
             ({'prompt': 'a', 'logprobs': 1, 'stream': True}, '/v1/completions', 'logprobs'),
             ({'messages': [{'role': 'user', 'content': 'hi'}], 'logprobs': True}, '/v1/chat/completions',
              'logprobs')]
    for body, path, param in cases:  # json.dumps writes lone surrogates as \ud800 escapes, as a client would
        got, r = raw(server, 'POST', path, json.dumps(body).encode())
        assert got == 400 and r['error']['param'] == param, (body, r)
    assert raw(server, 'GET', '/health')[0] == 200


@pytest.fixture
def slow_engine(server, monkeypatch):
    """The server's engine with 50 ms a token: 80 tokens take >= 4 s."""
    inner = server.engine.step_row

    def slow_step(row, token):
        time.sleep(0.05)
        inner(row, token)
    monkeypatch.setattr(server.engine, 'step_row', slow_step)
    return server.engine


def test_a_client_that_leaves_stops_its_rows(server, slow_engine):
    engine = slow_engine
    before = engine.stats['completion_tokens']
    s = socket.create_connection(('127.0.0.1', server.server_address[1]))
    body = json.dumps({'prompt': 'a', 'max_tokens': 80, 'temperature': 0}).encode()
    s.sendall(POST.replace(b'Connection: close\r\n', b'') + b'Content-Length: %d\r\n\r\n' % len(body) + body)
    deadline = time.time() + 10
    while engine.stats['completion_tokens'] < before + 5 and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats['completion_tokens'] >= before + 5  # it is generating
    s.close()
    time.sleep(0.5)
    after = engine.stats['completion_tokens']
    time.sleep(0.5)
    assert engine.stats['completion_tokens'] - before < 40 and engine.stats['completion_tokens'] == after


def test_a_streaming_client_that_leaves_stops_its_rows(server, slow_engine):
    engine = slow_engine
    before = engine.stats['completion_tokens']
    body = json.dumps({'prompt': 'a', 'max_tokens': 80, 'temperature': 0, 'stream': True}).encode()
    s = socket.create_connection(('127.0.0.1', server.server_address[1]))
    s.sendall(POST.replace(b'Connection: close\r\n', b'') + b'Content-Length: %d\r\n\r\n' % len(body) + body)
    s.settimeout(10)
    got = b''
    while b'data: ' not in got:  # the stream began
        got += s.recv(65536)
    s.close()
    time.sleep(1.0)
    after = engine.stats['completion_tokens']
    time.sleep(0.5)
    assert engine.stats['completion_tokens'] == after and after - before < 40


def test_rows_with_different_settings_share_a_step_and_seeds_do_not_depend_on_the_batch(server):
    engine = server.engine
    seeded = {'prompt': 'Era uma', 'max_tokens': 10, 'temperature': 0.9, 'top_p': 0.9, 'seed': 11}
    alone = raw(server, 'POST', '/v1/completions', seeded)[1]['choices'][0]['text']
    bodies = [seeded] + [{'prompt': f'x{i}', 'max_tokens': 10, 'temperature': t, 'top_k': k,
                          'repetition_penalty': p}
                         for i, (t, k, p) in enumerate([(0, 0, 1.0), (1.5, 5, 1.0), (0.7, 0, 1.3), (1.0, 0, 1.0)])]
    results = [None] * len(bodies)

    def ask(i):
        results[i] = raw(server, 'POST', '/v1/completions', bodies[i])
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    engine.pause()
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while engine.queued() < len(bodies) and time.time() < deadline:
            time.sleep(0.01)
    finally:
        engine.pause(False)
    for t in threads:
        t.join(30)
    assert engine.batch_sizes[-1] == len(bodies)  # five settings, one batch
    assert all(r[0] == 200 for r in results)
    assert results[0][1]['choices'][0]['text'] == alone
    assert results[1][1]['choices'][0]['text'] == greedy(server, 'x0', 10)


def test_a_request_of_many_rows_does_not_hold_back_the_next_one(tmp_path, model, tok):
    s = start(save_checkpoint(tmp_path / 'm', model, tok), max_batch=4)
    engine, done = s.engine, {}
    try:
        def ask(name, body):
            raw(s, 'POST', '/v1/completions', body)
            done[name] = time.time()
        big = threading.Thread(target=ask, args=('big', {'prompt': ['a'] * 64, 'max_tokens': 8, 'temperature': 0}))
        small = threading.Thread(target=ask, args=('small', {'prompt': 'b', 'max_tokens': 8, 'temperature': 0}))
        engine.pause()
        try:
            big.start()
            deadline = time.time() + 20
            while engine.queued() < 64 and time.time() < deadline:
                time.sleep(0.01)
            small.start()
            while engine.queued() < 65 and time.time() < deadline:
                time.sleep(0.01)
        finally:
            engine.pause(False)
        big.join(60), small.join(60)
        assert done['small'] < done['big']  # first come first served would have run 16 batches of 'a' first
    finally:
        s.shutdown()
        s.server_close()


def test_echo_logprobs_are_the_models_log_probabilities(server, model, tok):
    prompt = 'Era uma vez'
    got, r = raw(server, 'POST', '/v1/completions', {'prompt': prompt, 'max_tokens': 1, 'temperature': 0,
                                                     'logprobs': 2, 'echo': True})
    assert got == 200, r
    lp = r['choices'][0]['logprobs']
    ids = tok.encode(prompt, bos=True)
    assert len(lp['token_logprobs']) == len(ids) + 1 and lp['token_logprobs'][0] is None
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    want = logits[0].float().log_softmax(-1)
    for t in range(1, len(ids)):
        assert abs(lp['token_logprobs'][t] - float(want[t - 1, ids[t]])) < 1e-4
        assert len(lp['top_logprobs'][t]) <= 2
    greedy_id = int(want[-1].argmax())
    assert abs(lp['token_logprobs'][-1] - float(want[-1, greedy_id])) < 1e-4
    assert abs(max(lp['top_logprobs'][-1].values()) - lp['token_logprobs'][-1]) < 1e-6  # greedy = the top one
    # without echo: the reply's tokens only
    got, r = raw(server, 'POST', '/v1/completions', {'prompt': prompt, 'max_tokens': 3, 'temperature': 0,
                                                     'logprobs': 0})
    assert len(r['choices'][0]['logprobs']['token_logprobs']) == r['usage']['completion_tokens']


@pytest.mark.parametrize('prompt', ['no principio criou', 'e disse deus haja luz'])
def test_echo_logprobs_pieces_join_to_the_prompt_for_sentencepiece(tmp_path_factory, prompt):
    """Each logprobs token is the text it adds after the ones before (SentencePiece drops a lone piece's
    leading space when decoded alone), so the prompt's pieces and text_offsets agree with its text."""
    from conftest import tiny_sentencepieces, word_rotations
    texts = ['no principio criou deus os ceus e a terra', 'e a terra era sem forma e vazia e havia trevas',
             'e disse deus haja luz e houve luz', 'e viu deus que era boa a luz e fez separacao entre a luz e as trevas']
    tok = tiny_sentencepieces(word_rotations(texts), tmp_path_factory, 300)['bpe']
    s = start(save_checkpoint(tmp_path_factory.mktemp('sp') / 'sp', random_model(tok), tok))
    try:
        got, r = raw(s, 'POST', '/v1/completions', {'prompt': prompt, 'max_tokens': 1, 'temperature': 0,
                                                    'logprobs': 1, 'echo': True})
        assert got == 200, r
        lp = r['choices'][0]['logprobs']
        n = len(tok.encode(prompt, bos=True))  # <bos> (null) and the prompt's tokens, then the reply's one
        assert lp['tokens'][0] is None and ''.join(lp['tokens'][1:n]) == prompt
        assert [prompt[o:o + len(t)] for t, o in zip(lp['tokens'][1:n], lp['text_offset'][1:n])] == lp['tokens'][1:n]
    finally:
        s.shutdown()
        s.server_close()
