"""
Talking to an OpenAI-compatible endpoint (serve.py, vLLM, llama.cpp, OpenAI...) from many threads
at once, for data/synth.py and judge.py: one request with retries and backoff, and a map that keeps
N requests in flight and hands results back as they finish.

Standard library only (urllib), so the data tools need no client package. What is retried: a
connection error or timeout, 408, 429 (after its Retry-After when the server sends one), 5xx, and an
answer the caller's check rejects (invalid JSON, a story too short...). Any other 4xx (a bad key, an
unknown model) would fail every request the same way: it stops the run (Fatal), and so does a request
whose every try failed to connect while no request has ever got an answer (the endpoint is down).
"""
import json
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait


class Fatal(Exception):
    """An error no retry can fix: the run stops and says why."""


class Rejected(ValueError):
    """The endpoint answered, but not with what was asked for (the check's message says why)."""


def check_settings(concurrency, timeout, retries, backoff, temperature, max_tokens):
    """The request settings that judge.py and data/synth.py share; ValueError naming the first that is out of range
    (before the first request: a concurrency of 0 would start no request, a negative retries none either)."""
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # noqa: E731
    for key, value, ok, what in [
            ('concurrency', concurrency, whole(concurrency) and concurrency >= 1, 'a whole number >= 1'),
            ('timeout', timeout, number(timeout) and timeout > 0, 'a positive number of seconds'),
            ('retries', retries, whole(retries) and retries >= 0, 'a whole number >= 0'),
            ('backoff', backoff, number(backoff) and backoff >= 0, 'a number of seconds >= 0'),
            ('temperature', temperature, number(temperature) and temperature >= 0, 'a number >= 0'),
            ('max_tokens', max_tokens, whole(max_tokens) and max_tokens >= 1, 'a whole number >= 1')]:
        if not ok:
            raise ValueError(f"--{key}={value!r}: must be {what}")


class Client:
    def __init__(self, base_url, model, api_key='', timeout=60.0, retries=5, backoff=1.0, max_backoff=60.0):
        self.base_url, self.model, self.api_key = base_url.rstrip('/'), model, api_key
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.failures = {}  # kind of failure -> count (every retried attempt)
        self.lock = threading.Lock()
        self.reached = False  # whether the endpoint ever answered (an error status counts): see ask

    def default_model(self):
        """The first model the endpoint lists at /models (for --model=''); Fatal when it cannot be asked."""
        headers = {'Authorization': f'Bearer {self.api_key}'} if self.api_key else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.base_url + '/models', headers=headers),
                                        timeout=self.timeout) as r:
                self.reached = True
                return json.loads(r.read())['data'][0]['id']
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise Fatal(f"{self.base_url}/models answered {e.code}: the endpoint refused the API key (set it in "
                            f"the environment variable --api_key_env names)") from None
            raise Fatal(f"{self.base_url}/models answered {e.code}: name the model with --model") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise Fatal(f"cannot reach {self.base_url} ({unreachable(e)}): is the server running at that "
                        f"address?") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise Fatal(f"{self.base_url}/models did not list a model: name it with --model") from None

    def count(self, kind):
        with self.lock:
            self.failures[kind] = self.failures.get(kind, 0) + 1

    def post(self, path, body):
        """One POST -> parsed JSON; raises urllib's errors."""
        headers = {'Content-Type': 'application/json'}
        if self.api_key:
            headers['Authorization'] = f'Bearer {self.api_key}'
        request = urllib.request.Request(self.base_url + path, json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def ask(self, prompt=None, messages=None, chat=True, check=None, **params):
        """The text of one answer -> check(text) if check (it raises Rejected to ask again), else text.
        messages, or a prompt sent as one user message, go to /chat/completions; chat=False sends the
        prompt to /completions. Retries as the module says; raises Fatal, or the last error once the
        retries are spent."""
        if messages is None and chat:
            messages = [{'role': 'user', 'content': prompt}]
        path, body = (('/chat/completions', {'messages': messages}) if messages is not None else
                      ('/completions', {'prompt': prompt}))
        body = {'model': self.model, **body, **params}
        for attempt in range(self.retries + 1):
            wait_s = None
            try:
                answer = self.post(path, body)
                self.reached = True
                choice = answer['choices'][0]
                text = choice['message']['content'] if messages is not None else choice['text']
                return check(text) if check else text
            except urllib.error.HTTPError as e:
                self.reached = True
                detail = e.read()[:300].decode('utf-8', 'replace')
                if e.code not in (408, 429) and e.code < 500:
                    raise Fatal(f"{self.base_url}{path} answered {e.code}: {detail}")
                self.count(f'http {e.code}')
                error = e
                try:
                    wait_s = float(e.headers.get('Retry-After'))
                except (TypeError, ValueError):
                    pass
            except Rejected as e:
                self.count('rejected')
                error = e
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                self.count('connection' if not isinstance(getattr(e, 'reason', e), TimeoutError) else 'timeout')
                error = e
                if attempt == self.retries and not self.reached:
                    # every try of this request failed to connect, and no request ever got an answer: the
                    # endpoint is down or elsewhere, and every other request would fail the same way
                    raise Fatal(f"cannot reach {self.base_url} ({unreachable(e)}) after {attempt + 1} "
                                f"tr{'y' if attempt == 0 else 'ies'}: is the server running at that address?")
            except (ValueError, KeyError, IndexError, TypeError) as e:  # not an OpenAI answer at all
                self.count('bad response')
                error = e
            if attempt < self.retries:
                # exponential backoff with jitter, so that N threads do not come back all at once
                time.sleep(wait_s if wait_s is not None else
                           min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0))
        raise error


def unreachable(e):
    """Why a connection failed, in words: 'Connection refused', 'timed out', 'Name or service not known'..."""
    reason = getattr(e, 'reason', e)
    if isinstance(reason, TimeoutError):
        return 'timed out'
    return getattr(reason, 'strerror', None) or str(reason)


def run_all(jobs, work, concurrency):
    """Run work(job) for every job, concurrency at a time; yield (job, result or exception) as each
    finishes. A Fatal stops everything: no new job starts, and it is raised."""
    jobs = iter(jobs)
    with ThreadPoolExecutor(concurrency) as pool:
        running = {}
        try:
            while True:
                while len(running) < concurrency:
                    job = next(jobs, None)
                    if job is None:
                        break
                    running[pool.submit(work, job)] = job
                if not running:
                    return
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    error = future.exception()
                    if isinstance(error, Fatal):
                        raise error
                    yield job, error if error else future.result()
        finally:
            for future in running:
                future.cancel()
