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
in vLLM; 1.0 = off), echo and logprobs (completions: the prompt's and the reply's token
log-probabilities, as lm-evaluation-harness's local-completions model asks for them), stream
(server-sent events, with stream_options include_usage). Errors are the API's error objects: 400 for
a bad parameter or a prompt that does not fit the context (code context_length_exceeded), 401 for a
bad key, 403 for a request from another site's page, 404 for an unknown route or model, 408/413/415
for a body too slow, too big, or not JSON, 500 when generating a request fails (that request alone),
503 if the engine thread has stopped (/health says why).

The HTTP layer is Starlette under uvicorn (mirim/server.py, where the limits and what the server is
hardened for are written); the batching engine is mirim's own (mirim/engine.py: continuous batching,
each row with its own sampling settings, a fair queue).
"""
import os
import sys

from mirim.common import dtype_name, resolve_device, resolve_dtype
from mirim.configurator import configure
from mirim.server import build_server, loopback

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
    allow_origin='',          # web pages (origins, comma-separated, e.g. http://localhost:5173; '*' any) allowed to call
    quiet=False,              # no access log on stderr
)


def main(argv):
    config = configure(DEFAULTS, argv, help_source=__file__)  # --help reads the comments in DEFAULTS
    if config['max_batch'] < 1:
        raise ValueError("max_batch must be at least 1")
    if not 0 <= config['port'] <= 65535:
        raise ValueError(f"port={config['port']}: a TCP port is 0-65535 (0 = any free one)")
    api_key = config['api_key'] or os.environ.get('MIRIM_API_KEY', '')
    device = resolve_device(config['device'])
    dtype = resolve_dtype(config['dtype'], device)
    origins = [o.strip() for o in config['allow_origin'].split(',') if o.strip()]
    server = build_server(config['out_dir'], config['host'], config['port'], config['checkpoint'],
                          config['model_name'], api_key, config['chat_template'], config['max_batch'],
                          config['batch_wait'], device, dtype, config['quiet'], origins)
    host, port = server.server_address[:2]
    if not loopback(host) and not api_key:
        print("warning: listening beyond localhost with no API key: anyone who can reach it can use it",
              file=sys.stderr)
    template = server.template['name'] if server.template else 'none (completions only)'
    print(f"serving {server.model_name} ({device}, {dtype_name(dtype)}, chat template: {template}) on "
          f"http://{host}:{port}  (OpenAI API at http://{host}:{port}/v1; Ctrl-C stops)", file=sys.stderr)
    server.serve_forever()  # until Ctrl-C or SIGTERM: uvicorn finishes the open requests, then returns
    server.server_close()


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError, OSError) as e:  # CheckpointError and ConfigError are ValueErrors
        sys.exit(f"serve.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
