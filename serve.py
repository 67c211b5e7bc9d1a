"""
Serve a model over HTTP with the OpenAI API, as vLLM and llama.cpp's server speak it, plus a chat
page at / (serve_chat.html).

    python serve.py --out_dir=out/chat                      # http://127.0.0.1:8000
    python serve.py --out_dir=out/chat --host=0.0.0.0 --api_key=secret   # or MIRIM_API_KEY=secret

    from openai import OpenAI
    client = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='secret')
    client.completions.create(model='chat', prompt='Era uma vez', max_tokens=50, temperature=0)

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the checkpoint's chat
template), GET /health, GET /stats (batch sizes, tokens), GET / (the chat page). Sampling:
temperature, top_p, top_k, max_tokens, stop, stop_token_ids, seed, n, repetition_penalty (named as
in vLLM; 1.0 = off), echo (completions), stream (server-sent events, with stream_options
include_usage). Errors are the API's error objects: 400 for a bad parameter (every number must be
finite, a seed an integer 0 <= seed < 2**64; a temperature under 1e-5 is greedy, as in vLLM) or a
prompt that does not fit the context (code context_length_exceeded; nothing slides the window here,
as in vLLM), 401 for a bad key, 404 for an unknown route or model, 413 for a body over 4 MiB, 500
when generating a request fails (that request alone: a stream gets the error object as an event,
then its end; the engine goes on with the others), 503 if the engine thread has stopped (a bug:
/health then answers 503 with the reason, and requests are refused at once instead of hanging).

How requests are batched: every request becomes rows (one per prompt and choice) in one queue, and
one worker thread owns the model. It takes the oldest waiting row plus the waiting rows that can
share its batch (the same sampling settings, and every row's prompt and tokens still fit the
context), up to --max_batch rows, prefills them left-padded and decodes them together on the KV
cache (continuous batching, as in vLLM, but with one cache position shared by the batch): after
each step, rows that finished (eos, the chat stop token, a stop string, max_tokens) leave, and
waiting rows join: their prompts are prefilled so that they end where the running rows are (the
running rows move right when a new prompt is longer), and padding that every row has is dropped.
A request with a seed batches only with its own rows, so its samples do not depend on who else is
asking (rows of a batch share a torch.Generator, as in sample.py); greedy rows batch freely.

Why the standard library (http.server) and not FastAPI + uvicorn: the model is driven by one
thread anyway, so an event loop would only hand requests over to it; ThreadingHTTPServer gives each
connection a thread that waits on its request's queue, streams with chunked encoding, and adds no
dependency. It is not hardened for the open internet: keep it on localhost or behind a proxy.
"""
import hmac
import json
import math
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from mirim.chat import chat_ids, get_template, stop_id
from mirim.checkpoint import load_model
from mirim.common import dtype_name, resolve_device, resolve_dtype
from mirim.configurator import configure
from mirim.generate import decode_one_token, prefill, sample_next, vector_layout
from mirim.sampling import continuation_text

# -----------------------------------------------------------------------------
# defaults; a config file or --key=value overrides them (configurator.py)
DEFAULTS = dict(
    out_dir='out',            # a training out_dir, a checkpoint file, or a Hugging Face Llama folder
    checkpoint='ckpt.pt',     # file inside out_dir: ckpt.pt (latest) or best.pt (best validation loss)
    model_name='',            # the model id clients ask for; '' = the out_dir's folder name
    host='127.0.0.1',         # 0.0.0.0 listens on every interface: set an api_key then
    port=8000,
    api_key='',               # clients must send 'Authorization: Bearer KEY'; '' = $MIRIM_API_KEY, or none
    chat_template='',         # override the checkpoint's chat template: 'chatml' or 'aira' (chat.py)
    max_batch=32,             # rows decoded together at most
    batch_wait=0.005,         # seconds an idle worker waits for more requests before it starts a batch
    device='auto',            # 'cpu', 'cuda', 'cuda:1', 'mps'; auto picks cuda, then mps, then cpu
    dtype='auto',             # 'float32', 'bfloat16', 'float16'; auto = bfloat16 on a GPU that has it, else float32
    quiet=False,              # no access log on stderr
)

MAX_BODY = 4 << 20  # bytes of request JSON
MAX_N = 128
MAX_ROWS = 256          # rows one request may queue: len(prompts) * n
MAX_STOPS = 16          # stop strings per request (each is checked at every token, in the shared engine thread)
MAX_STOP_CHARS = 256    # characters per stop string
MAX_MESSAGES = 1024     # messages per chat request
MIN_TEMPERATURE = 1e-5  # below it sampling is greedy, as in vLLM (1e-300 would overflow the logits)
SEEDS = 2 ** 64  # torch.Generator.manual_seed takes 0 <= seed < 2**64 (and a negative one as 2**64 + seed)
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve_chat.html')


class APIError(Exception):
    """An error the client caused (or must hear about), sent as OpenAI's error object."""

    def __init__(self, status, message, type='invalid_request_error', param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self):
        return {'error': {'message': self.message, 'type': self.type, 'param': self.param, 'code': self.code}}


# -----------------------------------------------------------------------------
# text, one token at a time

class RowText:
    """The text of one row as its tokens arrive, as sample.decode_stream makes it: a piece that ends
    in U+FFFD (a character split over several tokens) waits for the next token."""

    def __init__(self, tokenizer, context_ids):
        self.tokenizer, self.anchor, self.pending = tokenizer, list(context_ids[-4:]), []

    def feed(self, token):
        self.pending.append(token)
        piece = continuation_text(self.tokenizer, self.anchor, self.pending)
        if piece.endswith('\ufffd'):
            return ''
        self.anchor, self.pending = (self.anchor + self.pending)[-4:], []
        return piece

    def flush(self):
        piece = continuation_text(self.tokenizer, self.anchor, self.pending) if self.pending else ''
        self.pending = []
        return piece


def held_back(text, stops):
    """How many characters at the end of text could be the start of a stop string (not sent yet)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


# -----------------------------------------------------------------------------
# requests and the worker that batches them

class Request:
    """One API request: its rows (prompt ids per choice) and the queue its events arrive on:
    (choice index, new text, finish_reason or None, tokens generated so far)."""

    def __init__(self, prompts, n, max_tokens, knobs, seed, stops, stop_ids):
        self.prompts, self.n, self.max_tokens, self.knobs, self.seed = prompts, n, max_tokens, knobs, seed
        self.stops, self.stop_ids = stops, stop_ids
        self.events = queue.Queue()
        self.cancelled = False  # the client left, or the request failed: its rows stop
        self.error = None       # the exception that failed it, once it has
        greedy = knobs['temperature'] == 0
        # rows batch together when they sample alike; a seeded request only with itself
        self.key = (('greedy', knobs['repetition_penalty']) if greedy else
                    (tuple(sorted(knobs.items())), id(self) if seed is not None else None))
        self.rows = [Row(self, i * n + j, ids) for i, ids in enumerate(prompts) for j in range(n)]


class Row:
    """One choice of one request: its prompt ids and its text so far (sent: how much of it is sent)."""

    def __init__(self, request, choice, ids):
        self.request, self.choice, self.ids = request, choice, ids
        self.text, self.sent, self.count, self.done = '', 0, 0, False
        self.reader = None  # its RowText, once it is in a batch

    def remaining(self):
        return self.request.max_tokens - self.count


class Batch:
    """The rows decoded together on the KV cache. All rows write their next token at the same cache
    position `pos`; a shorter prompt is left-padded (left_pad). seen (B, pos) holds the tokens in the
    cache (for the repetition penalty) and logits (B, vocab) each row's next-token logits."""

    def __init__(self, model, pad_id):
        self.model, self.pad_id = model, pad_id
        self.device, self.block_size = model.output.weight.device, model.config.block_size
        self.rows, self.pos, self.seen, self.left_pad, self.logits = [], 0, None, None, None
        self.generator = None  # the torch.Generator of a seeded batch (its first request's)
        self.taken = []  # every row taken for the batch (their requests fail if the engine must give up)
        self.layout = None  # an ExitStack holding generate.vector_layout while the batch is one row

    def fits(self, rows):
        """Whether rows can join: every row's remaining tokens still fit the context after the join."""
        pos = max([self.pos if self.rows else 0] + [len(r.ids) for r in rows])
        return all(pos + r.remaining() <= self.block_size for r in self.rows + rows)

    def caches(self):
        return [layer.attention for layer in self.model.layers]

    def shift(self, d):
        """Move every row d positions right (d > 0: more left padding) or left (d < 0: drop padding
        that all rows have). Keys keep their rotary positions, which count from each row's text."""
        for a in self.caches():  # what wraps around lands beyond pos or in the padding: never read
            a.cache_k, a.cache_v = a.cache_k.roll(d, 2), a.cache_v.roll(d, 2)
        pad = torch.full((len(self.rows), max(d, 0)), self.pad_id, dtype=torch.long, device=self.device)
        self.seen = torch.cat([pad, self.seen[:, max(-d, 0):]], 1)
        self.left_pad, self.pos = self.left_pad + d, self.pos + d

    def vector_layout(self, on):
        """generate.py's batch-1 weight layout, for one row on the CPU in fp32. It stays on from step to
        step (entering it for every step cost 12-28% of a step) and is entered outside inference mode."""
        on = on and self.device.type == 'cpu' and self.model.output.weight.dtype == torch.float32
        if on and self.layout is None:
            self.layout = ExitStack()
            self.layout.enter_context(vector_layout(self.model))
        elif not on and self.layout is not None:
            self.layout.close()
            self.layout = None

    @torch.inference_mode()
    def add(self, rows):
        """Prefill rows' prompts so that they end where the batch's rows are, then join them. When the
        prefill fails, the batch is as it was (its rows' caches are put back) and can go on."""
        self.vector_layout(False)  # a prefill, and the batch grows: the usual layout
        pos = max([self.pos if self.rows else 0] + [len(r.ids) for r in rows])
        idx = torch.full((len(rows), pos), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            idx[i, pos - len(row.ids):] = torch.tensor(row.ids)
        idx, left_pad = idx.to(self.device), torch.tensor([pos - len(r.ids) for r in rows], device=self.device)
        running = [(a.cache_k, a.cache_v) for a in self.caches()] if self.rows else None
        try:
            self.model.setup_cache(len(rows), self.block_size, device=self.device)
            logits = prefill(self.model, idx, left_pad)
            new = [(a.cache_k, a.cache_v) for a in self.caches()]
        finally:
            if running:
                for a, (k, v) in zip(self.caches(), running):
                    a.cache_k, a.cache_v = k, v
        if running:
            if pos > self.pos:
                self.shift(pos - self.pos)
            for a, (k, v) in zip(self.caches(), new):
                a.cache_k, a.cache_v = torch.cat([a.cache_k, k]), torch.cat([a.cache_v, v])
            idx, left_pad, logits = (torch.cat(pair) for pair in ((self.seen, idx), (self.left_pad, left_pad),
                                                                   (self.logits, logits)))
        self.rows, self.pos, self.seen, self.left_pad, self.logits = self.rows + rows, pos, idx, left_pad, logits

    def advance(self, tokens, keep):
        """Append this step's tokens (B,), keep the rows that go on (a list of bools) and run their
        tokens through the model for the next logits."""
        if not any(keep):
            self.rows = []
            self.vector_layout(False)
            return
        if not all(keep):
            index = torch.tensor([i for i, k in enumerate(keep) if k], device=self.device)
            for a in self.caches():
                a.cache_k, a.cache_v = a.cache_k[index], a.cache_v[index]
            self.rows = [row for row, k in zip(self.rows, keep) if k]
            tokens, self.seen, self.left_pad = tokens[index], self.seen[index], self.left_pad[index]
        self.seen = torch.cat([self.seen, tokens[:, None]], 1)
        self.vector_layout(len(self.rows) == 1)
        with torch.inference_mode():
            self.logits = decode_one_token(self.model, tokens, self.pos, self.left_pad)
        self.pos += 1
        if int(self.left_pad.min()) > 0:  # the rows that kept the batch this wide have left
            self.shift(-int(self.left_pad.min()))


def requests_of(rows):
    """The requests rows belong to, each once, in order."""
    return list({id(row.request): row.request for row in rows}.values())


class Engine:
    """The worker thread that owns the model and decodes waiting rows in batches, continuously: after
    every step, rows that finished leave the batch and waiting rows that sample alike join it.

    No request stops it: whatever raises while a request's rows are admitted, prefilled, sampled or
    stepped fails that request alone (fail(): its client hears an error object, its rows leave) and
    the batch goes on; only a failed forward step, which the batch's rows share, fails the requests
    of that batch. What raises outside of that (a bug in the engine's own bookkeeping) stops the
    thread, and then failure() says why: /health answers 503 and requests are refused at once."""

    def __init__(self, model, tokenizer, max_batch=32, batch_wait=0.005):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.waiting = []
        self.cond = threading.Condition()
        self.paused = False  # tests hold the worker to line requests up
        self.batch_sizes = deque(maxlen=10000)  # rows in each batch when it starts
        self.stats = Counter()
        self.batch = None  # the batch being decoded
        self.dead = None   # why the worker thread stopped, once it has
        self.thread = threading.Thread(target=self.loop, name='mirim-engine', daemon=True)
        self.thread.start()

    def submit(self, request):
        with self.cond:
            reason = self.failure()
            if reason:
                raise APIError(503, reason, type='server_error', code='engine_stopped')
            self.waiting.extend(request.rows)
            self.stats['requests'] += 1
            self.cond.notify()

    def failure(self):
        """None while the worker thread serves; else why it does not."""
        if self.dead:
            return self.dead
        return None if self.thread.is_alive() else "the engine thread is not running"

    def fail(self, request, error):
        """Fail one request with error (an APIError for bad input, else an internal error): its client
        hears it, its running rows leave the batch after this step and its waiting rows are dropped."""
        request.cancelled = True
        if request.error is not None:
            return
        request.error = error
        self.stats['failed_requests'] += 1
        if not isinstance(error, APIError):
            print(f"serve.py: a request failed in the engine, which goes on: {type(error).__name__}: {error}",
                  file=sys.stderr)
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        request.events.put(error)

    def pause(self, paused=True):
        with self.cond:
            self.paused = paused
            self.cond.notify()

    def queued(self):
        with self.cond:
            return len(self.waiting)

    def take_rows(self, batch):
        """The waiting rows, oldest first, that can join batch: the same sampling settings, room in the
        context and in max_batch. An empty batch takes the oldest row first. Stops at the first row
        that cannot join, so that no row waits behind younger ones for long."""
        self.waiting = [r for r in self.waiting if not r.request.cancelled]
        taken = []
        key = batch.rows[0].request.key if batch.rows else None
        for row in self.waiting:
            if len(batch.rows) + len(taken) == self.max_batch or (key is not None and row.request.key != key):
                break
            if not batch.fits(taken + [row]):  # alone a row always fits: requests are checked for that
                break
            taken.append(row)
            key = row.request.key
        self.waiting = self.waiting[len(taken):]
        return taken

    def loop(self):
        try:
            while True:
                with self.cond:
                    while self.paused or not self.waiting:
                        self.cond.wait()
                time.sleep(self.batch_wait)  # let requests that arrive together start together
                with self.cond:
                    if self.paused:
                        continue
                    batch = self.batch = Batch(self.model, self.pad_id)
                    rows = self.take_rows(batch)
                if not rows:
                    continue
                self.batch_sizes.append(len(rows))
                self.stats['batches'] += 1
                try:
                    self.run(batch, rows)
                except Exception as e:  # escaped the per-request handling: the batch's requests fail
                    for request in requests_of(row for row in batch.taken if not row.done):
                        self.fail(request, e)
                finally:
                    self.batch = None
                    batch.vector_layout(False)
                    self.model.release_cache()
        except BaseException as e:  # a bug in the engine itself: say so, refuse new requests, fail the rest
            self.die(e)

    def die(self, error):
        reason = f"the engine stopped: {type(error).__name__}: {error}"
        print(f"serve.py: {reason}; requests get 503 from now on", file=sys.stderr)
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        with self.cond:
            self.dead = reason
            rows, self.waiting = self.waiting + (self.batch.taken if self.batch else []), []
        for request in requests_of(row for row in rows if not row.done):
            self.fail(request, APIError(503, reason, type='server_error', code='engine_stopped'))

    def run(self, batch, rows):
        """Decode until no row is left, sending each row's new text as it is made."""
        batch.taken += rows
        while True:
            self.admit(batch, rows)
            if not batch.rows:
                return
            tokens = self.sample(batch)
            for row, token in zip(batch.rows, tokens.tolist()):
                try:
                    self.step_row(row, token)
                except Exception as e:
                    self.fail(row.request, e)
            self.stats['steps'] += 1
            self.stats['row_steps'] += len(batch.rows)
            try:
                batch.advance(tokens, [not row.done and not row.request.cancelled for row in batch.rows])
            except Exception as e:  # the rows share the step: none of them can go on
                for request in requests_of(batch.rows):
                    self.fail(request, e)
                return
            if not batch.rows:
                return
            with self.cond:
                rows = self.take_rows(batch)
            batch.taken += rows
            self.stats['joined'] += len(rows)

    def admit(self, batch, rows):
        """Join rows to the batch: their readers, the generator of a seeded batch, the prefill. A request
        whose rows raise fails and the others join; a prefill that raises for the rows of several
        requests is tried again one request at a time, so that only the one that raises fails."""
        groups = []  # the rows of each request
        for request in requests_of(rows):
            group = [row for row in rows if row.request is request]
            try:
                if not batch.rows and not groups:  # the batch starts with this request: its generator
                    batch.generator = None
                    if request.seed is not None and request.knobs['temperature'] > 0:
                        batch.generator = torch.Generator(device=batch.device).manual_seed(
                            (request.seed + group[0].choice) % SEEDS)
                for row in group:
                    row.reader = RowText(self.tokenizer, row.ids)
                groups.append(group)
            except Exception as e:
                self.fail(request, e)
        if not groups:
            return
        try:
            batch.add([row for group in groups for row in group])
        except Exception as e:
            if len(groups) == 1:
                return self.fail(groups[0][0].request, e)
            for group in list(groups):
                try:
                    batch.add(group)
                except Exception as e:
                    self.fail(group[0].request, e)
                    groups.remove(group)
        self.stats['rows'] += sum(map(len, groups))

    def sample(self, batch):
        """This step's token of every row (B,). When sampling the batch raises, its rows are sampled
        one by one: the requests whose rows raise fail (their rows get a pad token and leave)."""
        knobs = batch.rows[0].request.knobs  # the same for every row of the batch
        draw = lambda rows: sample_next(batch.logits[rows].float(), batch.seen[rows], generator=batch.generator,
                                        left_pad=batch.left_pad[rows], **knobs)
        with torch.inference_mode():
            try:
                return draw(slice(None))
            except Exception as e:
                if len(requests_of(batch.rows)) == 1:
                    self.fail(batch.rows[0].request, e)
                    return torch.full((len(batch.rows),), self.pad_id, dtype=torch.long, device=batch.device)
            tokens = []
            for i, row in enumerate(batch.rows):
                token = torch.full((1,), self.pad_id, dtype=torch.long, device=batch.device)
                if not row.request.cancelled:
                    try:
                        token = draw(slice(i, i + 1))
                    except Exception as e:
                        self.fail(row.request, e)
                tokens.append(token)
            return torch.cat(tokens)

    def step_row(self, row, token):
        """One new token for one row: extend its text, check its stops, send what is safe to send."""
        request = row.request
        if request.cancelled:
            row.done = True
            return
        row.count += 1
        self.stats['completion_tokens'] += 1
        finish = None
        if token == self.tokenizer.eos_id or token in request.stop_ids:
            row.text += row.reader.flush()
            finish = 'stop'
        else:
            before = len(row.text)
            row.text += row.reader.feed(token)
            cut = [i for i in (row.text.find(stop, max(0, before - len(stop) + 1)) for stop in request.stops)
                   if i >= 0]
            if cut:
                row.text = row.text[:min(cut)]
                finish = 'stop'
            elif row.count >= request.max_tokens:
                row.text += row.reader.flush()
                finish = 'length'
        end = len(row.text) if finish else len(row.text) - held_back(row.text, request.stops)
        if end > row.sent or finish:
            request.events.put((row.choice, row.text[row.sent:end], finish, row.count))
            row.sent = end
        row.done = finish is not None


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
    if body.get('logit_bias'):
        raise APIError(400, "'logit_bias' is not supported", param='logit_bias')
    top_k = number(body, 'top_k', 0, lo=-1, integer=True)
    temperature = number(body, 'temperature', 1.0, lo=0)
    return dict(temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
                top_p=number(body, 'top_p', 1.0, lo=0, hi=1, open_lo=True),
                top_k=max(top_k, 0),  # vLLM's -1 and 0 both mean no limit
                repetition_penalty=number(body, 'repetition_penalty', 1.0, lo=0, open_lo=True))


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


# -----------------------------------------------------------------------------
# the server

class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: the default 5 makes a burst of clients wait for SYN retries

    def __init__(self, address, model, tokenizer, model_name, api_key='', chat_template='', max_batch=32,
                 batch_wait=0.005, quiet=False):
        self.model_name, self.api_key, self.quiet = model_name, api_key, quiet
        self.tokenizer = tokenizer
        self.template = chat_template or tokenizer.chat_template
        self.template = get_template(self.template) if self.template else None
        self.chat_stop = stop_id(self.template, tokenizer) if self.template else None
        self.block_size = model.config.block_size
        self.created = int(time.time())
        self.engine = Engine(model, tokenizer, max_batch, batch_wait)
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'  # keep-alive; streams use chunked encoding
    server_version = 'mirim-serve'

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)

    # ---- plumbing

    def send_json(self, status, obj):
        data = json.dumps(obj, ensure_ascii=False).encode('utf-8')
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_object(self, error):
        if error.status == 401:
            self.close_connection = True
        self.send_json(error.status, error.body())

    def start_stream(self):
        self.streaming = True
        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream')
        self.send_header('Cache-Control', 'no-cache')
        self.send_header('Transfer-Encoding', 'chunked')
        self.end_headers()

    def send_event(self, data):
        """One server-sent event, as one HTTP chunk."""
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        payload = f"data: {text}\n\n".encode('utf-8')
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()

    def end_stream(self):
        self.send_event('[DONE]')
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def read_body(self):
        length = int(self.headers.get('Content-Length') or 0)
        if length > MAX_BODY:
            self.close_connection = True  # the body is not read
            raise APIError(413, f"request body of {length} bytes is over the limit of {MAX_BODY}")
        try:
            body = json.loads(self.rfile.read(length) or b'null')
        except ValueError as e:
            raise APIError(400, f"the body is not valid JSON: {e}")
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    def check_key(self):
        if not self.server.api_key:
            return
        given = self.headers.get('Authorization', '')
        token = given[7:] if given.startswith('Bearer ') else ''
        if not hmac.compare_digest(token.encode(), self.server.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           code='invalid_api_key')

    def check_model(self, body):
        name = body.get('model')
        if name is not None and name != self.server.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server has '{self.server.model_name}'",
                           param='model', code='model_not_found')

    def dispatch(self, method):
        path = self.path.split('?')[0].rstrip('/') or '/'
        self.streaming = False
        try:
            if path.startswith('/v1/'):
                self.check_key()
            routes = {('GET', '/'): self.page, ('GET', '/health'): self.health, ('GET', '/stats'): self.stats,
                      ('GET', '/v1/models'): self.models, ('POST', '/v1/completions'): self.completions,
                      ('POST', '/v1/chat/completions'): self.chat_completions}
            if (method, path) in routes:
                return routes[method, path]()
            if method == 'GET' and path.startswith('/v1/models/'):
                return self.one_model(path[len('/v1/models/'):])
            if any(p == path for _, p in routes):
                raise APIError(405, f"{method} is not allowed on {path}")
            raise APIError(404, f"no route {method} {path}", code='not_found')
        except APIError as e:
            self.send_error_object(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug in a route: a 500 error object rather than a dropped connection
            traceback.print_exc()
            self.close_connection = True
            if not self.streaming:
                self.send_error_object(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                                type='server_error'))

    def do_GET(self):
        self.dispatch('GET')

    def do_POST(self):
        self.dispatch('POST')

    # ---- routes

    def page(self):
        with open(PAGE, 'rb') as f:
            data = f.read()
        self.send_response(200)
        self.send_header('Content-Type', 'text/html; charset=utf-8')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def health(self):
        reason = self.server.engine.failure()
        if reason:
            return self.send_json(503, {'status': 'error', 'reason': reason})
        self.send_json(200, {'status': 'ok'})

    def stats(self):
        engine = self.server.engine
        stats = engine.stats
        self.send_json(200, {**stats, 'waiting_rows': engine.queued(),
                             'rows_per_step': round(stats['row_steps'] / max(stats['steps'], 1), 2),
                             'batch_sizes': dict(Counter(engine.batch_sizes))})

    def model_card(self):
        return {'id': self.server.model_name, 'object': 'model', 'created': self.server.created,
                'owned_by': 'mirim', 'max_model_len': self.server.block_size}

    def models(self):
        self.send_json(200, {'object': 'list', 'data': [self.model_card()]})

    def one_model(self, name):
        self.check_model({'model': name})
        self.send_json(200, self.model_card())

    def common(self, body, prompts, default_max_tokens, stop_ids=()):
        """Check the settings every generating route shares -> a Request (not yet submitted)."""
        self.check_model(body)
        if body.get('logprobs') or body.get('top_logprobs'):
            raise APIError(400, "'logprobs' is not supported", param='logprobs')
        if body.get('suffix'):
            raise APIError(400, "'suffix' is not supported", param='suffix')
        fmt = body.get('response_format')
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get('type') != 'text'):
            raise APIError(400, "only response_format {'type': 'text'} is supported", param='response_format')
        if not isinstance(body.get('stream_options') or {}, dict):
            raise APIError(400, "'stream_options' must be an object", param='stream_options')
        n = number(body, 'n', 1, lo=1, hi=MAX_N, integer=True)
        if len(prompts) * n > MAX_ROWS:
            raise APIError(400, f"{len(prompts)} prompts x n={n} is {len(prompts) * n} rows; the limit is "
                                f"{MAX_ROWS} per request (len(prompts) * n)", param='n')
        best_of = body.get('best_of')
        if best_of is not None and best_of != n:
            raise APIError(400, "'best_of' is not supported (other than equal to n)", param='best_of')
        knobs = sampling(body)
        seed = number(body, 'seed', None, lo=0, hi=SEEDS - 1, integer=True)
        key = 'max_completion_tokens' if body.get('max_completion_tokens') is not None else 'max_tokens'
        longest = max(len(p) for p in prompts)
        block = self.server.block_size
        if longest >= block:
            raise APIError(400, f"this model's maximum context length is {block} tokens; the prompt has "
                                f"{longest}", param='messages' if stop_ids else 'prompt',
                           code='context_length_exceeded')
        max_tokens = number(body, key, None, lo=1, integer=True)
        if max_tokens is None:
            max_tokens = min(default_max_tokens or block, block - longest)
        elif longest + max_tokens > block:
            raise APIError(400, f"this model's maximum context length is {block} tokens; you asked for "
                                f"{longest + max_tokens} ({longest} in the prompt, {max_tokens} to generate)",
                           param=key, code='context_length_exceeded')
        extra = token_list(body.get('stop_token_ids') or [], 'stop_token_ids', self.server.tokenizer.vocab_size)
        return Request(prompts, n, max_tokens, knobs, seed, stop_strings(body), set(stop_ids) | set(extra))

    def completions(self):
        body = self.read_body()
        tok = self.server.tokenizer
        prompt = body.get('prompt')
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            prompts = prompt
        else:
            raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param='prompt')
        # text starts with <bos>, like every training document (sample.py does the same); ids are taken as given
        ids = [tok.encode(p, bos=True) if isinstance(p, str) else token_list(p, 'prompt', tok.vocab_size)
               for p in prompts]
        if not all(ids):
            raise APIError(400, "a prompt of token ids must not be empty", param='prompt')
        request = self.common(body, ids, 16)  # OpenAI's default max_tokens for completions
        echo = bool(body.get('echo'))
        texts = [(p if isinstance(p, str) else tok.decode(p)) if echo else '' for p in prompts]
        self.answer(body, request, 'text_completion', 'cmpl', lambda choice: texts[choice // request.n])

    def chat_completions(self):
        body = self.read_body()
        template = self.server.template
        if template is None:
            raise APIError(400, "this model has no chat template (it was not fine-tuned for chat): use "
                                "/v1/completions, or start the server with --chat_template=chatml")
        messages = body.get('messages')
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param='messages')
        if len(messages) > MAX_MESSAGES:
            raise APIError(400, f"'messages' has {len(messages)} messages; the limit is {MAX_MESSAGES}",
                           param='messages')
        plain = []
        for m in messages:
            if not isinstance(m, dict):
                raise APIError(400, "each message must be an object with 'role' and 'content'", param='messages')
            content = m.get('content')
            if isinstance(content, list):  # content parts: only text ones
                if not all(isinstance(p, dict) and p.get('type') == 'text' for p in content):
                    raise APIError(400, "only text content parts are supported", param='messages')
                content = ''.join(p.get('text', '') for p in content)
            role = 'system' if m.get('role') == 'developer' else m.get('role')
            plain.append({'role': role, 'content': '' if content is None else content})
        try:
            ids, _ = chat_ids(plain, template, self.server.tokenizer, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), param='messages')
        request = self.common(body, [ids], None, stop_ids=(self.server.chat_stop,))
        self.answer(body, request, 'chat.completion', 'chatcmpl', None)

    def answer(self, body, request, kind, prefix, head):
        """Submit the request and send its choices, whole or streamed. head(choice) is text a
        completion choice starts with (echo); None for chat."""
        self.server.engine.submit(request)
        try:
            self.send_choices(body, request, kind, prefix, head)
        finally:  # answered, failed or left: nothing more of it is decoded
            request.cancelled = True

    def next_event(self, request):
        """The request's next event; while none comes, check that the engine still runs (a stopped one
        fails the request with a 503 instead of leaving its client waiting forever)."""
        while True:
            try:
                return request.events.get(timeout=0.5)
            except queue.Empty:
                reason = self.server.engine.failure()
                if reason:
                    return APIError(503, reason, type='server_error', code='engine_stopped')

    def send_choices(self, body, request, kind, prefix, head):
        chat = head is None
        rid, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        usage = lambda counts: {'prompt_tokens': sum(map(len, request.prompts)),
                                'completion_tokens': sum(counts.values()),
                                'total_tokens': sum(map(len, request.prompts)) + sum(counts.values())}
        meta = {'id': rid, 'object': kind + ('.chunk' if chat and body.get('stream') else ''), 'created': created,
                'model': self.server.model_name}
        total, counts, finished = len(request.rows), {}, {}
        if not body.get('stream'):
            texts = {c: (head(c) if head else '') for c in range(total)}
            while len(finished) < total:
                event = self.next_event(request)
                if isinstance(event, Exception):
                    raise engine_error(event)
                choice, piece, finish, count = event
                texts[choice] += piece
                counts[choice] = count
                if finish:
                    finished[choice] = finish
            choices = [({'index': c, 'message': {'role': 'assistant', 'content': texts[c]}, 'logprobs': None,
                         'finish_reason': finished[c]} if chat else
                        {'index': c, 'text': texts[c], 'logprobs': None, 'finish_reason': finished[c]})
                       for c in range(total)]
            return self.send_json(200, {**meta, 'choices': choices, 'usage': usage(counts)})

        include_usage = bool((body.get('stream_options') or {}).get('include_usage'))
        chunk = lambda choices: {**meta, 'choices': choices, **({'usage': None} if include_usage else {})}
        try:
            self.start_stream()
            for c in range(total):  # chat: each choice opens with its role; completions: the echo
                if chat:
                    self.send_event(chunk([{'index': c, 'delta': {'role': 'assistant', 'content': ''},
                                            'logprobs': None, 'finish_reason': None}]))
                elif head(c):
                    self.send_event(chunk([{'index': c, 'text': head(c), 'logprobs': None, 'finish_reason': None}]))
            while len(finished) < total:
                events = [self.next_event(request)]
                while not request.events.empty():  # when this thread fell behind, one chunk per choice for all
                    events.append(request.events.get())
                error = next((e for e in events if isinstance(e, Exception)), None)
                if error is not None:  # the error object as an event, then the end of the stream
                    self.send_event(engine_error(error).body())
                    return self.end_stream()
                pieces = {}  # choice -> (its new text, its finish_reason or None)
                for choice, piece, finish, count in events:
                    counts[choice] = count
                    pieces[choice] = (pieces.get(choice, ('', None))[0] + piece, finish)
                    if finish:
                        finished[choice] = finish
                for choice, (piece, finish) in pieces.items():
                    if piece or finish:
                        content = {'delta': {'content': piece} if piece else {}} if chat else {'text': piece}
                        self.send_event(chunk([{'index': choice, **content, 'logprobs': None,
                                                'finish_reason': finish}]))
            if include_usage:
                self.send_event({**meta, 'choices': [], 'usage': usage(counts)})
            self.end_stream()
        except (BrokenPipeError, ConnectionResetError):  # the client left
            self.close_connection = True


def engine_error(error):
    """The API error for a request that failed in the engine: its own APIError (bad input), else a 500."""
    if isinstance(error, APIError):
        return error
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", type='server_error')


# -----------------------------------------------------------------------------

def build_server(out_dir, host='127.0.0.1', port=8000, checkpoint='ckpt.pt', model_name='', api_key='',
                 chat_template='', max_batch=32, batch_wait=0.005, device='cpu', dtype=None, quiet=False):
    """Load the model and bind the server (port 0 = any free port); serve_forever() runs it."""
    model, tokenizer, _ = load_model(out_dir, device, dtype, checkpoint=checkpoint)
    name = model_name or os.path.basename(os.path.normpath(out_dir if os.path.isdir(out_dir)
                                                           else os.path.dirname(os.path.abspath(out_dir))))
    try:
        return Server((host, port), model, tokenizer, name, api_key, chat_template, max_batch, batch_wait, quiet)
    except OSError as e:  # "Address already in use" and its kind, which would not say which address
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def main(argv):
    config = configure(DEFAULTS, argv, help_source=__file__)  # --help reads the comments in DEFAULTS
    if config['max_batch'] < 1:
        raise ValueError("max_batch must be at least 1")
    if not 0 <= config['port'] <= 65535:
        raise ValueError(f"port={config['port']}: a TCP port is 0-65535 (0 = any free one)")
    api_key = config['api_key'] or os.environ.get('MIRIM_API_KEY', '')
    device = resolve_device(config['device'])
    dtype = resolve_dtype(config['dtype'], device)
    server = build_server(config['out_dir'], config['host'], config['port'], config['checkpoint'],
                          config['model_name'], api_key, config['chat_template'], config['max_batch'],
                          config['batch_wait'], device, dtype, config['quiet'])
    host, port = server.server_address[:2]
    if host not in ('127.0.0.1', 'localhost', '::1') and not api_key:
        print("warning: listening beyond localhost with no API key: anyone who can reach it can use it",
              file=sys.stderr)
    template = server.template['name'] if server.template else 'none (completions only)'
    print(f"serving {server.model_name} ({device}, {dtype_name(dtype)}, chat template: {template}) on "
          f"http://{host}:{port}  (OpenAI API at http://{host}:{port}/v1; Ctrl-C stops)", file=sys.stderr)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError, OSError) as e:  # CheckpointError and ConfigError are ValueErrors
        sys.exit(f"serve.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
