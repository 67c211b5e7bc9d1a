"""
serve.py's HTTP side: the OpenAI API (as vLLM and llama.cpp's server speak it) and the chat page,
as a Starlette app under uvicorn, in front of mirim's own batching engine (mirim/engine.py: one
worker thread drives the model). Request parsing, chunked bodies, keep-alive, HEAD, and noticing
that a client left are the ASGI stack's; what is checked here is what the API means.

    server = build_server('out/chat', port=0)      # binds now (port 0: any free port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ... http://127.0.0.1:{server.server_address[1]}/v1 ...
    server.shutdown(); server.server_close()

Routes: GET / (the chat page), GET /health, GET /stats, GET /v1/models[/NAME], POST /v1/completions,
POST /v1/chat/completions. Errors are OpenAI error objects. Every limit below is a 400 or 413 that
names it.

What the server guards against, and what not: it is for one machine or a trusted network. It
listens on 127.0.0.1 by default; with an api_key every route but /health and the (static) page asks
for it; a request whose Origin is another site than the page's own is refused (403), as is, on a
loopback address, a Host header that is not a loopback name (DNS rebinding), unless allow_origin
names the origin; a POST must say Content-Type: application/json (a web page cannot send that
cross-site without the browser asking first). It has no TLS, no rate limit per client and no header
timeout of its own (uvicorn's limit on open connections caps what half-sent requests can hold):
behind a reverse proxy for anything public.
"""
import asyncio
import hmac
import ipaddress
import json
import math
import os
import socket
import threading
import time
import uuid
from collections import Counter
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Route

from mirim.chat import chat_ids, get_template, stop_id
from mirim.checkpoint import load_model
from mirim.engine import SEEDS, APIError, Engine, Request
from mirim.sampling import continuation_text

MAX_BODY = 4 << 20      # bytes of request JSON
BODY_SECONDS = 30       # a request body must arrive within this (else 408)
MAX_N = 128
MAX_ROWS = 256          # rows one request may queue: len(prompts) * n
MAX_STOPS = 16          # stop strings per request (each is checked at every token, in the shared engine thread)
MAX_STOP_CHARS = 256    # characters per stop string
MAX_MESSAGES = 1024     # messages per chat request
MAX_LOGPROBS = 5        # top tokens listed per position (OpenAI's limit for completions)
MIN_TEMPERATURE = 1e-5  # below it sampling is greedy, as in vLLM (1e-300 would overflow the logits)
PENALTY_RANGE = (1e-2, 1e2)  # repetition_penalty: beyond it the penalized logits overflow
LOOPBACK_NAMES = ('localhost', '127.0.0.1', '::1')
PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'serve_chat.html')


# -----------------------------------------------------------------------------
# reading a request's parameters

def shown(value, limit=40):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + '...'


def number(body, name, default, lo=None, hi=None, integer=False, open_lo=False):
    """body[name], checked: an int (integer=True) or a finite float, within lo and hi; missing or null ->
    default. Anything else (a bool, a string, a float for an integer, NaN, Infinity, a number beyond a
    float) is a 400 that names the parameter: every number of a request is read here."""
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {shown(value)}",
                       param=name)
    if not integer:
        try:
            value = float(value)
        except OverflowError:  # an integer too big for a float
            value = math.inf
        if not math.isfinite(value):
            raise APIError(400, f"'{name}' must be a finite number, got {shown(body[name])}", param=name)
    if (lo is not None and (value <= lo if open_lo else value < lo)) or (hi is not None and value > hi):
        bounds = ' and '.join(b for b in (lo is not None and f"{'>' if open_lo else '>='} {lo}",
                                          hi is not None and f"<= {hi}") if b)
        raise APIError(400, f"'{name}' must be {bounds}, got {shown(value)}", param=name)
    return value


def sampling(body):
    """The request's sampling settings in generate.py's terms (0 / 1.0 = off)."""
    for name in ('presence_penalty', 'frequency_penalty'):
        if number(body, name, 0):
            raise APIError(400, f"'{name}' is not supported; use 'repetition_penalty' (> 1 penalizes)", param=name)
    for name in ('logit_bias', 'tools', 'tool_choice', 'functions', 'function_call'):
        if body.get(name):
            raise APIError(400, f"'{name}' is not supported", param=name)
    top_k = number(body, 'top_k', 0, lo=-1, integer=True)
    temperature = number(body, 'temperature', 1.0, lo=0)
    return dict(temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
                top_p=number(body, 'top_p', 1.0, lo=0, hi=1, open_lo=True),
                top_k=max(top_k, 0),  # vLLM's -1 and 0 both mean no limit
                repetition_penalty=number(body, 'repetition_penalty', 1.0, *PENALTY_RANGE))


def stop_strings(body):
    stop = body.get('stop')
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", param='stop')
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"'stop' has {len(stops)} strings; the limit is {MAX_STOPS}", param='stop')
    longest = max(len(s) for s in stops) if stops else 0
    if longest > MAX_STOP_CHARS:
        raise APIError(400, f"a 'stop' string has {longest} characters; the limit is {MAX_STOP_CHARS}", param='stop')
    return stops


def token_list(value, name, vocab_size):
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise APIError(400, f"'{name}' must be a list of token ids", param=name)
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"'{name}' holds token ids outside the vocab of {vocab_size}: {bad[:5]}", param=name)
    return value


def count_rows(body, prompts):
    """n, checked: the request's rows (prompts x n) within MAX_ROWS."""
    n = number(body, 'n', 1, lo=1, hi=MAX_N, integer=True)
    if prompts * n > MAX_ROWS:
        raise APIError(400, f"{prompts} prompts x n={n} is {prompts * n} rows; the limit is {MAX_ROWS} per "
                            f"request (len(prompts) * n)", param='n')
    return n


def message_text(m):
    """One chat message's role and text; content parts must all be text parts."""
    if not isinstance(m, dict):
        raise APIError(400, "each message must be an object with 'role' and 'content'", param='messages')
    role, content = m.get('role'), m.get('content')
    if not isinstance(role, str):
        raise APIError(400, f"a message's 'role' must be a string, got {shown(role)}", param='messages')
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get('type') == 'text' and isinstance(p.get('text'), str)
                   for p in content):
            raise APIError(400, "only text content parts ({'type': 'text', 'text': '...'}) are supported",
                           param='messages')
        content = ''.join(p['text'] for p in content)
    if content is not None and not isinstance(content, str):
        raise APIError(400, f"a message's 'content' must be a string or a list of text parts, got "
                            f"{shown(content)}", param='messages')
    return {'role': 'system' if role == 'developer' else role, 'content': content or ''}


def engine_error(error):
    """The API error for a request that failed in the engine: its own APIError (bad input), else a 500."""
    if isinstance(error, APIError):
        return error
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", type='server_error')


def delivery(events):
    """The engine's deliver(event) for a request: puts it on the request's asyncio queue from the worker thread.
    Once the event loop has closed (the server is stopping) there is no one to hear it: dropped."""
    loop = asyncio.get_running_loop()

    def deliver(event):
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed
            pass
    return deliver


def json_response(status, obj):
    return Response(json.dumps(obj, ensure_ascii=False), status_code=status, media_type='application/json')


def logprobs_object(tokenizer, entries, start, context):
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset, for entries
    [(token, log-probability, top [(token, log-probability)])] (None: the prompt's first token, already in
    context) whose text starts at character start, after the ids in context. Each piece is the text its
    token adds after the tokens before it (sampling.continuation_text), so the pieces join to the text."""
    out = {'tokens': [], 'token_logprobs': [], 'top_logprobs': [], 'text_offset': []}
    finite = lambda x: x if math.isfinite(x) else -9999.0  # JSON has no -Infinity (vLLM's stand-in)
    context = list(context)
    for entry in entries:
        out['text_offset'].append(start)
        if entry is None:
            out['tokens'].append(None), out['token_logprobs'].append(None), out['top_logprobs'].append(None)
            continue
        token, value, top = entry
        piece = continuation_text(tokenizer, context, [token])
        out['tokens'].append(piece)
        out['token_logprobs'].append(finite(value))
        out['top_logprobs'].append({continuation_text(tokenizer, context, [t]): finite(v) for t, v in top}
                                   if top else None)
        context.append(token)
        start += len(piece)
    return out


# -----------------------------------------------------------------------------
# who may ask

def loopback(host):
    try:
        return host == 'localhost' or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value):
    """'[::1]:8000' -> '::1', 'localhost:8000' -> 'localhost'."""
    value = value.strip().lower()
    if value.startswith('['):
        return value[1:value.find(']')] if ']' in value else value
    return value.rsplit(':', 1)[0] if value.count(':') == 1 else value


class Guard:
    """ASGI middleware: refuses (403) a request from another site's page (its Origin is neither this
    server, as the Host header names it, nor one of allow_origin) and, on a loopback address, one whose
    Host is not a loopback name (a DNS rebinding attack reaches 127.0.0.1 under the attacker's name)."""

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope['type'] == 'http':
            headers = {k.decode('latin-1'): v.decode('latin-1') for k, v in scope['headers']}
            reason = self.refusal(headers.get('host', ''), headers.get('origin'))
            if reason:
                return await json_response(403, APIError(403, reason, code='forbidden').body())(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, host, origin):
        allowed = self.server.allow_origin
        if loopback(self.server.server_address[0]) and host_name(host) not in LOOPBACK_NAMES:
            return (f"Host '{host}' is not a loopback name, and this server listens on a loopback address: "
                    f"refused (DNS rebinding); use http://127.0.0.1:{self.server.server_address[1]}")
        if origin is None or '*' in allowed or origin in allowed:
            return None
        if urlsplit(origin).netloc.lower() != host.lower():
            return (f"requests from the page of {origin} are refused (another site); start the server with "
                    f"--allow_origin={origin} to let that page use it")
        return None


# -----------------------------------------------------------------------------
# the server

class Server:
    """The model's engine and the app, bound to its socket at construction (so a port in use is an error
    now, and port 0 has its real number in server_address); serve_forever() runs uvicorn on it."""

    def __init__(self, host, port, model, tokenizer, model_name, api_key='', chat_template='', max_batch=32,
                 batch_wait=0.005, quiet=False, allow_origin=(), max_connections=1024):
        self.model_name, self.api_key, self.quiet = model_name, api_key, quiet
        self.allow_origin = list(allow_origin)
        self.body_seconds = BODY_SECONDS
        self.tokenizer = tokenizer
        self.template = chat_template or tokenizer.chat_template
        self.template = get_template(self.template) if self.template else None
        self.chat_stop = stop_id(self.template, tokenizer) if self.template else None
        self.block_size = model.config.block_size
        self.created = int(time.time())
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=128)
        self.server_address = self.socket.getsockname()[:2]
        self.engine = Engine(model, tokenizer, max_batch, batch_wait)
        config = uvicorn.Config(self.app(), http='h11', loop='asyncio', lifespan='off', access_log=not quiet,
                                log_level='warning' if quiet else 'info', timeout_keep_alive=5,
                                limit_concurrency=max_connections, timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        self.running, self.stopped = threading.Event(), threading.Event()

    def serve_forever(self):
        self.running.set()
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.running.clear()
            self.stopped.set()

    def shutdown(self):
        """Stop serve_forever (from another thread) and wait until it has returned."""
        self.uvicorn.should_exit = True
        if self.running.is_set():
            self.stopped.wait()

    def server_close(self):
        self.socket.close()

    def app(self):

        async def http_error(request, e):  # Starlette's own 404 and 405, as error objects
            code = 'not_found' if e.status_code == 404 else None
            what = (f"no route {request.method} {request.url.path}" if e.status_code == 404 else
                    f"{request.method} is not allowed on {request.url.path}")
            return json_response(e.status_code, APIError(e.status_code, what, code=code).body())

        async def api_error(request, e):
            return json_response(e.status, e.body())

        async def internal(request, e):  # a bug in a route: an error object, not a dropped connection
            return json_response(500, APIError(500, f"internal error: {type(e).__name__}: {e}",
                                               type='server_error').body())

        routes = [Route('/', self.page), Route('/health', self.health), Route('/stats', self.stats),
                  Route('/v1/models', self.models), Route('/v1/models/{name:path}', self.one_model),
                  Route('/v1/completions', self.completions, methods=['POST']),
                  Route('/v1/chat/completions', self.chat_completions, methods=['POST'])]
        middleware = [Middleware(Guard, server=self)]
        if self.allow_origin:  # the browser's CORS handshake for the pages allowed
            middleware.append(Middleware(CORSMiddleware, allow_origins=self.allow_origin,
                                         allow_methods=['GET', 'POST'], allow_headers=['Authorization', 'Content-Type']))
        return Starlette(routes=routes, middleware=middleware, exception_handlers={
            HTTPException: http_error, APIError: api_error, Exception: internal})

    # ---- checks every route shares

    def check_key(self, request):
        if not self.api_key:
            return
        scheme, _, token = request.headers.get('authorization', '').strip().partition(' ')
        token = token.strip() if scheme.lower() == 'bearer' else ''  # the scheme is case-insensitive (RFC 7235)
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'", code='invalid_api_key')

    def check_model(self, body):
        name = body.get('model')
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {shown(name)} does not exist; this server has '{self.model_name}'",
                           param='model', code='model_not_found')

    async def read_body(self, request):
        """The request's JSON object: application/json, at most MAX_BODY bytes, within body_seconds."""
        self.check_key(request)
        length = request.headers.get('content-length', '')
        if length.isdigit() and int(length) > MAX_BODY:
            raise APIError(413, f"request body of {length} bytes is over the limit of {MAX_BODY}")
        kind = request.headers.get('content-type', '').split(';')[0].strip().lower()
        if kind != 'application/json':
            raise APIError(415, f"send the body as JSON with 'Content-Type: application/json' (got "
                                f"{shown(kind or None)})")
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY:
                    raise APIError(413, f"request body is over the limit of {MAX_BODY} bytes")
                chunks.append(chunk)
        try:
            await asyncio.wait_for(read(), self.body_seconds)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.body_seconds} s") from None
        try:
            body = json.loads(b''.join(chunks) or b'null')
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise APIError(400, f"the body is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    # ---- routes

    async def page(self, request):
        return FileResponse(PAGE, media_type='text/html; charset=utf-8')

    async def health(self, request):
        reason = self.engine.failure()
        if reason:
            return json_response(503, {'status': 'error', 'reason': reason})
        return json_response(200, {'status': 'ok'})

    async def stats(self, request):
        self.check_key(request)
        engine, stats = self.engine, self.engine.stats
        return json_response(200, {**stats, 'waiting_rows': engine.queued(),
                                   'rows_per_step': round(stats['row_steps'] / max(stats['steps'], 1), 2),
                                   'batch_sizes': dict(Counter(engine.batch_sizes))})

    def model_card(self):
        return {'id': self.model_name, 'object': 'model', 'created': self.created, 'owned_by': 'mirim',
                'max_model_len': self.block_size}

    async def models(self, request):
        self.check_key(request)
        return json_response(200, {'object': 'list', 'data': [self.model_card()]})

    async def one_model(self, request):
        self.check_key(request)
        self.check_model({'model': request.path_params['name']})
        return json_response(200, self.model_card())

    def common(self, body, prompts, default_max_tokens, deliver, stop_ids=(), chat=False):
        """Check the settings every generating route shares -> a Request (not yet submitted)."""
        self.check_model(body)
        if body.get('suffix'):
            raise APIError(400, "'suffix' is not supported", param='suffix')
        fmt = body.get('response_format')
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get('type') != 'text'):
            raise APIError(400, "only response_format {'type': 'text'} is supported", param='response_format')
        if not isinstance(body.get('stream_options') or {}, dict):
            raise APIError(400, "'stream_options' must be an object", param='stream_options')
        logprobs = None
        if chat and (body.get('logprobs') or body.get('top_logprobs')):
            raise APIError(400, "'logprobs' is supported on /v1/completions only", param='logprobs')
        if not chat and body.get('logprobs') is not None:
            logprobs = number(body, 'logprobs', None, lo=0, hi=MAX_LOGPROBS, integer=True)
            if body.get('stream'):
                raise APIError(400, "'logprobs' is not supported with 'stream'", param='logprobs')
        n = count_rows(body, len(prompts))
        best_of = body.get('best_of')
        if best_of is not None and best_of != n:
            raise APIError(400, "'best_of' is not supported (other than equal to n)", param='best_of')
        knobs = sampling(body)
        seed = number(body, 'seed', None, lo=0, hi=SEEDS - 1, integer=True)
        key = 'max_completion_tokens' if body.get('max_completion_tokens') is not None else 'max_tokens'
        longest = max(len(p) for p in prompts)
        block = self.block_size
        if longest >= block:
            raise APIError(400, f"this model's maximum context length is {block} tokens; the prompt has "
                                f"{longest}", param='messages' if chat else 'prompt', code='context_length_exceeded')
        max_tokens = number(body, key, None, lo=1, integer=True)
        if max_tokens is None:
            max_tokens = min(default_max_tokens or block, block - longest)
        elif longest + max_tokens > block:
            raise APIError(400, f"this model's maximum context length is {block} tokens; you asked for "
                                f"{longest + max_tokens} ({longest} in the prompt, {max_tokens} to generate)",
                           param=key, code='context_length_exceeded')
        extra = token_list(body.get('stop_token_ids') or [], 'stop_token_ids', self.tokenizer.vocab_size)
        return Request(prompts, n, max_tokens, knobs, seed, stop_strings(body), set(stop_ids) | set(extra), deliver,
                       logprobs=logprobs, prompt_logprobs=logprobs is not None and bool(body.get('echo')))

    async def completions(self, request):
        body = await self.read_body(request)
        tok = self.tokenizer
        prompt = body.get('prompt')
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool)
                                                         for p in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            prompts = prompt
        else:
            raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param='prompt')
        count_rows(body, len(prompts))  # before encoding them all

        def encode():  # text starts with <bos>, like every training document (as in sample.py); ids are as given
            try:
                return [tok.encode(p, bos=True) if isinstance(p, str) else token_list(p, 'prompt', tok.vocab_size)
                        for p in prompts]
            except ValueError as e:  # text that is no text (a lone surrogate)
                raise APIError(400, f"'prompt': {e}", param='prompt') from None
        ids = await run_in_threadpool(encode)  # the event loop goes on serving meanwhile
        if not all(ids):
            raise APIError(400, "a prompt of token ids must not be empty", param='prompt')
        events = asyncio.Queue()
        job = self.common(body, ids, 16, delivery(events))  # OpenAI's default max_tokens: 16
        echo = bool(body.get('echo'))
        texts = [(p if isinstance(p, str) else tok.decode(p)) if echo else '' for p in prompts]
        return await self.answer(request, body, job, events, 'text_completion', 'cmpl',
                                 lambda choice: texts[choice // job.n])

    async def chat_completions(self, request):
        body = await self.read_body(request)
        if self.template is None:
            raise APIError(400, "this model has no chat template (it was not fine-tuned for chat): use "
                                "/v1/completions, or start the server with --chat_template=chatml")
        messages = body.get('messages')
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param='messages')
        if len(messages) > MAX_MESSAGES:
            raise APIError(400, f"'messages' has {len(messages)} messages; the limit is {MAX_MESSAGES}",
                           param='messages')
        plain = [message_text(m) for m in messages]

        def encode():
            try:
                return chat_ids(plain, self.template, self.tokenizer, add_generation_prompt=True)[0]
            except ValueError as e:
                raise APIError(400, str(e), param='messages') from None
        ids = await run_in_threadpool(encode)  # the event loop goes on serving meanwhile
        events = asyncio.Queue()
        job = self.common(body, [ids], None, delivery(events),
                          stop_ids=(self.chat_stop,), chat=True)
        return await self.answer(request, body, job, events, 'chat.completion', 'chatcmpl', None)

    async def next_event(self, job, events):
        """The request's next event; while none comes, check that the engine still runs (a stopped one
        fails the request with a 503 instead of leaving its client waiting forever)."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                reason = self.engine.failure()
                if reason:
                    return APIError(503, reason, type='server_error', code='engine_stopped')

    async def answer(self, request, body, job, events, kind, prefix, head):
        """Submit the request and send its choices, whole or streamed. head(choice) is text a completion
        choice starts with (echo); None for chat. Rows stop as soon as the client has left."""
        self.engine.submit(job)
        chat = head is None
        meta = {'id': f"{prefix}-{uuid.uuid4().hex}", 'created': int(time.time()), 'model': self.model_name,
                'object': kind + ('.chunk' if chat and body.get('stream') else '')}
        prompt_tokens = sum(map(len, job.prompts))
        usage = lambda counts: {'prompt_tokens': prompt_tokens, 'completion_tokens': sum(counts.values()),
                                'total_tokens': prompt_tokens + sum(counts.values())}
        total = len(job.rows)
        if not body.get('stream'):
            try:
                return await self.whole(request, job, events, meta, head, usage, total)
            finally:  # answered, failed or left: nothing more of it is decoded
                job.cancelled = True
        return StreamingResponse(self.stream(body, job, events, meta, head, usage, total),
                                 media_type='text/event-stream', headers={'Cache-Control': 'no-cache'})

    async def whole(self, request, job, events, meta, head, usage, total):
        chat = head is None
        texts = {c: (head(c) if head else '') for c in range(total)}
        counts, finished, rows = {}, {}, {}
        waiting = asyncio.ensure_future(self.left(request))
        try:
            while len(finished) < total:
                get = asyncio.ensure_future(self.next_event(job, events))
                await asyncio.wait([get, waiting], return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the client left: its rows stop
                    get.cancel()
                    job.cancelled = True
                    return json_response(499, {'error': {'message': 'the client closed the connection'}})
                event = get.result()
                if isinstance(event, Exception):
                    raise engine_error(event)
                choice, piece, finish, count, row = event
                texts[choice] += piece
                counts[choice] = count
                if finish:
                    finished[choice], rows[choice] = finish, row
        finally:
            waiting.cancel()
        choices = []
        for c in range(total):
            if chat:
                choices.append({'index': c, 'message': {'role': 'assistant', 'content': texts[c]}, 'logprobs': None,
                                'finish_reason': finished[c]})
                continue
            logprobs = None
            if job.logprobs is not None:
                row = rows[c]
                entries = (row.prompt_logprobs or []) + row.logprobs
                logprobs = logprobs_object(self.tokenizer, entries, 0 if row.prompt_logprobs else len(head(c)),
                                           row.ids[:1] if row.prompt_logprobs else row.ids)
            choices.append({'index': c, 'text': texts[c], 'logprobs': logprobs, 'finish_reason': finished[c]})
        return json_response(200, {**meta, 'choices': choices, 'usage': usage(counts)})

    @staticmethod
    async def left(request):
        """Returns once the client has closed the connection (the ASGI server says so)."""
        while True:
            message = await request.receive()
            if message['type'] == 'http.disconnect':
                return

    async def stream(self, body, job, events, meta, head, usage, total):
        chat = head is None
        include_usage = bool((body.get('stream_options') or {}).get('include_usage'))
        chunk = lambda choices: {**meta, 'choices': choices, **({'usage': None} if include_usage else {})}
        event_text = lambda data: f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
        counts, finished = {}, {}
        try:
            for c in range(total):  # chat: each choice opens with its role; completions: the echo
                if chat:
                    yield event_text(chunk([{'index': c, 'delta': {'role': 'assistant', 'content': ''},
                                             'logprobs': None, 'finish_reason': None}]))
                elif head(c):
                    yield event_text(chunk([{'index': c, 'text': head(c), 'logprobs': None, 'finish_reason': None}]))
            while len(finished) < total:
                batch = [await self.next_event(job, events)]
                while not events.empty():  # when this client fell behind, one chunk per choice for all
                    batch.append(events.get_nowait())
                error = next((e for e in batch if isinstance(e, Exception)), None)
                if error is not None:  # the error object as an event, then the end of the stream
                    yield event_text(engine_error(error).body())
                    break
                pieces = {}  # choice -> (its new text, its finish_reason or None)
                for choice, piece, finish, count, _ in batch:
                    counts[choice] = count
                    pieces[choice] = (pieces.get(choice, ('', None))[0] + piece, finish)
                    if finish:
                        finished[choice] = finish
                for choice, (piece, finish) in pieces.items():
                    if piece or finish:
                        content = {'delta': {'content': piece} if piece else {}} if chat else {'text': piece}
                        yield event_text(chunk([{'index': choice, **content, 'logprobs': None,
                                                 'finish_reason': finish}]))
            else:
                if include_usage:
                    yield event_text({**meta, 'choices': [], 'usage': usage(counts)})
            yield event_text('[DONE]')
        finally:  # answered, failed or the client left (the generator is closed): nothing more is decoded
            job.cancelled = True


def build_server(out_dir, host='127.0.0.1', port=8000, checkpoint='ckpt.pt', model_name='', api_key='',
                 chat_template='', max_batch=32, batch_wait=0.005, device='cpu', dtype=None, quiet=False,
                 allow_origin=()):
    """Load the model and bind the server (port 0 = any free port); serve_forever() runs it."""
    model, tokenizer, _ = load_model(out_dir, device, dtype, checkpoint=checkpoint)
    name = model_name or os.path.basename(os.path.normpath(out_dir if os.path.isdir(out_dir)
                                                           else os.path.dirname(os.path.abspath(out_dir))))
    try:
        return Server(host, port, model, tokenizer, name, api_key, chat_template, max_batch, batch_wait, quiet,
                      allow_origin)
    except OSError as e:  # "Address already in use" and its kind, which would not say which address
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
