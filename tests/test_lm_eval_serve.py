"""lm-evaluation-harness's `local-completions` model scoring a log-likelihood task against serve.py
(echo + logprobs on /v1/completions) gives eval.py's per-choice log-likelihoods (to 1e-4) and its
accuracy. The tokenizer lm-eval encodes with is the model's export (its ids are mirim's)."""
import os
import threading
from dataclasses import asdict

import pytest
import torch

import eval as mirim_eval
import export
from mirim import server as serve
from mirim.checkpoint import load_model
from model import LlamaConfig
from test_lm_eval import VOCAB, agrees_with_eval_py, task, tok, trained_like  # noqa: F401 (fixtures)

pytest.importorskip('lm_eval', reason="lm-evaluation-harness is not installed (pip install lm-eval, "
                                      "requirements-dev.txt)")
pytestmark = pytest.mark.usefixtures('one_thread')


def test_lm_eval_local_completions_against_serve_py_gives_eval_py_scores(tok, task, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    for name in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'TRANSFORMERS_OFFLINE'):
        monkeypatch.setenv(name, '1')
    monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'datasets'))
    monkeypatch.delenv('OPENAI_API_KEY', raising=False)
    config = LlamaConfig(vocab_size=VOCAB, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                         ffn_hidden=96, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    out = tmp_path / 'demo'
    os.makedirs(out)
    torch.save({'model': trained_like(config, seed=3).state_dict(), 'model_config': asdict(config),
                'tokenizer': tok.to_dict()}, out / 'ckpt.pt')
    dest = export.export(str(out), str(tmp_path / 'hf'))
    folder, examples = task
    mirim_model, mirim_tok, _ = load_model(str(out))
    metrics, ours = mirim_eval.evaluate_multiple_choice(mirim_model, mirim_tok, examples)

    server = serve.build_server(str(out), port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base_url = f"http://127.0.0.1:{server.server_address[1]}/v1/completions"
        # eval.py starts every context with <bos>, as training documents start: add_bos_token=True
        results = simple_evaluate(
            model='local-completions', tasks=['mirim_choices'], task_manager=TaskManager(include_path=folder),
            model_args=f'model=demo,base_url={base_url},tokenizer={dest},tokenizer_backend=huggingface,'
                       f'add_bos_token=True,num_concurrent=2,max_retries=1', log_samples=True)
    finally:
        server.shutdown()
        server.server_close()
    agrees_with_eval_py(results, examples, ours, metrics, 'through serve.py')
    assert server.engine.stats['requests'] >= sum(map(len, ours))  # every choice was asked of the server
