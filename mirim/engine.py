"""
The batching engine behind serve.py: one worker thread owns the model and decodes the waiting rows
of every request together on the KV cache (continuous batching, as in vLLM, with one cache position
shared by the batch).

Every request becomes rows (one per prompt and choice). The worker takes waiting rows in turn, one
row of each waiting request before anyone's next (a fair queue: a request of 256 rows cannot hold
back a one-row request behind it), up to max_batch rows whose prompts and tokens fit the context,
prefills them left-padded and decodes them together. After each step, rows that finished (eos, the
chat stop token, a stop string, max_tokens) leave, and waiting rows join: their prompts are
prefilled so that they end where the running rows are (the running rows move right when a new
prompt is longer), and padding that every row has is dropped.

Rows sample with their own settings in one step (generate.sample_rows: temperature, top_k, top_p
and repetition_penalty per row), so clients that ask differently still share a batch. A seeded row
draws from its own torch.Generator (seed + its choice index), so its samples do not depend on who
else is asking (up to float rounding, which differs with the batch's shape: as in vLLM).

No request stops the engine: whatever raises for one request fails that request alone (its client
hears an error object). Requests hear their events through their deliver() callback, called on the
worker thread: (choice, new text, finish_reason or None, tokens so far, the Row) or an exception.
"""
import sys
import threading
import time
import traceback
from collections import Counter, deque
from contextlib import ExitStack
from itertools import chain, zip_longest

import torch

from mirim.generate import decode_one_token, prefill, sample_rows, vector_layout
from mirim.sampling import continuation_text

SEEDS = 2 ** 64  # torch.Generator.manual_seed takes 0 <= seed < 2**64


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
    """One API request: its rows (prompt ids per choice), how they sample (knobs: temperature, top_k,
    top_p, repetition_penalty; seed), when they stop, and deliver(event), which the worker calls with
    each event: (choice index, new text, finish_reason or None, tokens generated so far, the Row), or
    the exception that failed the request. logprobs = k: each generated token's log-probability under
    the model and the k most likely tokens (0: none listed); prompt_logprobs: the same for the prompt's
    tokens (echo), read from its prefill."""

    def __init__(self, prompts, n, max_tokens, knobs, seed, stops, stop_ids, deliver, logprobs=None,
                 prompt_logprobs=False):
        self.prompts, self.n, self.max_tokens, self.knobs, self.seed = prompts, n, max_tokens, knobs, seed
        self.stops, self.stop_ids, self.deliver = stops, stop_ids, deliver
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.cancelled = False  # the client left, or the request failed: its rows stop
        self.error = None       # the exception that failed it, once it has
        self.rows = [Row(self, i * n + j, ids) for i, ids in enumerate(prompts) for j in range(n)]


class Row:
    """One choice of one request: its prompt ids and its text so far (sent: how much of it is sent)."""

    def __init__(self, request, choice, ids):
        self.request, self.choice, self.ids = request, choice, ids
        self.text, self.sent, self.count, self.done = '', 0, 0, False
        self.reader = None  # its RowText, once it is in a batch
        self.generator = None  # its own torch.Generator when its request has a seed
        self.logprobs = []  # (token, log-probability, [(token, log-probability)] of the top k) per token
        self.prompt_logprobs = None  # the same for the prompt (its first token: None), when asked
        self.next_logprob = None  # this step's entry, from sample() to step_row()

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
    def add(self, rows, score=False):
        """Prefill rows' prompts so that they end where the batch's rows are, then join them. When the
        prefill fails, the batch is as it was (its rows' caches are put back) and can go on. score: also
        set each row's prompt_logprobs, from the prefill's logits at every position."""
        self.vector_layout(False)  # a prefill, and the batch grows: the usual layout
        pos = max([self.pos if self.rows else 0] + [len(r.ids) for r in rows])
        idx = torch.full((len(rows), pos), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            idx[i, pos - len(row.ids):] = torch.tensor(row.ids)
        idx, left_pad = idx.to(self.device), torch.tensor([pos - len(r.ids) for r in rows], device=self.device)
        running = [(a.cache_k, a.cache_v) for a in self.caches()] if self.rows else None
        try:
            self.model.setup_cache(len(rows), self.block_size, device=self.device)
            if score:
                every = self.model.forward_cached(idx, 0, left_pad, last_only=False)
                for i, row in enumerate(rows):
                    pad = pos - len(row.ids)
                    lp = every[i, pad:-1].float().log_softmax(-1)
                    row.prompt_logprobs = [None] + [token_logprob(lp[t], row.ids[t + 1], row.request.logprobs)
                                                    for t in range(len(row.ids) - 1)]
                logits = every[:, -1]
            else:
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


def token_logprob(logprobs, token, top):
    """(token, its log-probability, the top most likely tokens as (token, log-probability)) from one
    position's log-softmax (vocab,)."""
    best = torch.topk(logprobs, top) if top else None
    return (token, float(logprobs[token]),
            list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else [])


def requests_of(rows):
    """The requests rows belong to, each once, in order."""
    return list({id(row.request): row.request for row in rows}.values())


class Engine:
    """The worker thread that owns the model and decodes waiting rows in batches, continuously: after
    every step, rows that finished leave the batch and waiting rows join it.

    No request stops it: whatever raises while a request's rows are admitted, prefilled, sampled or
    stepped fails that request alone (fail(): its client hears an error object, its rows leave) and
    the batch goes on; only a failed forward step, which the batch's rows share, fails the requests
    of that batch. What raises outside of that (a bug in the engine's own bookkeeping) stops the
    thread, and then failure() says why: /health answers 503 and requests are refused at once."""

    def __init__(self, model, tokenizer, max_batch=32, batch_wait=0.005):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ())))  # unseeded rows' draws
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
        request.deliver(error)

    def pause(self, paused=True):
        with self.cond:
            self.paused = paused
            self.cond.notify()

    def queued(self):
        with self.cond:
            return len(self.waiting)

    def take_rows(self, batch):
        """The waiting rows that can join batch (room in the context and in max_batch), in turns: the
        first waiting row of each request, oldest request first, then each one's second... so that
        a request with many rows shares the batch with the ones behind it. Stops at the first row that
        cannot join, so that no row waits behind younger ones for long."""
        self.waiting = [r for r in self.waiting if not r.request.cancelled]
        per_request = {}
        for row in self.waiting:
            per_request.setdefault(id(row.request), []).append(row)
        taken = []
        for row in chain.from_iterable(zip_longest(*per_request.values())):
            if row is None:
                continue
            if len(batch.rows) + len(taken) == self.max_batch or not batch.fits(taken + [row]):
                break  # alone a row always fits: requests are checked for that
            taken.append(row)
        chosen = set(map(id, taken))
        self.waiting = [r for r in self.waiting if id(r) not in chosen]
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
        """Join rows to the batch: their readers and generators, the prefill. A request whose rows raise
        fails and the others join; a prefill that raises for the rows of several requests is tried again
        one request at a time, so that only the one that raises fails. Rows that want their prompt's
        log-probabilities are prefilled apart, one request at a time (that prefill keeps every position's
        logits)."""
        groups = []  # the rows of each request
        for request in requests_of(rows):
            group = [row for row in rows if row.request is request]
            try:
                for row in group:
                    row.reader = RowText(self.tokenizer, row.ids)
                    if request.seed is not None and request.knobs['temperature'] > 0:
                        row.generator = torch.Generator().manual_seed((request.seed + row.choice) % SEEDS)
                groups.append(group)
            except Exception as e:
                self.fail(request, e)
        plain = [group for group in groups if not group[0].request.prompt_logprobs]
        scored = [group for group in groups if group[0].request.prompt_logprobs]
        joined = []
        if plain:
            try:
                batch.add([row for group in plain for row in group])
                joined += plain
                plain = []
            except Exception as e:
                if len(plain) == 1:
                    self.fail(plain[0][0].request, e)
                    plain = []
        for group, score in [(g, False) for g in plain] + [(g, True) for g in scored]:
            try:
                batch.add(group, score=score)
                joined.append(group)
            except Exception as e:
                self.fail(group[0].request, e)
        self.stats['rows'] += sum(map(len, joined))

    def sample(self, batch):
        """This step's token of every row (B,), each row with its own settings and its own draw (its
        generator's when seeded, else the engine's). When sampling the batch raises, its rows are
        sampled one by one: the requests whose rows raise fail (their rows get a pad token and leave)."""
        uniform = torch.rand(len(batch.rows), generator=self.generator)
        for i, row in enumerate(batch.rows):
            if row.generator is not None:
                uniform[i] = torch.rand((), generator=row.generator)
        uniform = uniform.to(batch.device)

        def draw(rows):
            knobs = {name: torch.tensor([row.request.knobs[name] for row in batch.rows[rows]], device=batch.device)
                     for name in ('temperature', 'top_k', 'top_p', 'repetition_penalty')}
            tokens = sample_rows(batch.logits[rows].float(), batch.seen[rows], uniform=uniform[rows],
                                 left_pad=batch.left_pad[rows], **knobs)
            for row, i in zip(batch.rows[rows], range(len(batch.rows))[rows]):
                if row.request.logprobs is not None:
                    row.next_logprob = token_logprob(batch.logits[i].float().log_softmax(-1),
                                                     int(tokens[i - (rows.start or 0)]), row.request.logprobs)
            return tokens

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
        if row.next_logprob is not None:
            row.logprobs.append(row.next_logprob)
            row.next_logprob = None
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
            request.deliver((row.choice, row.text[row.sent:end], finish, row.count, row))
            row.sent = end
        row.done = finish is not None


