"""
Bad inputs on every command line of the project: each case runs one real command with one user
error (a wrong type, a number out of range, a missing file, a file of the wrong kind, an unknown
choice, an unwritable output, ...) and says how it ended:

    clear      exit status != 0, no traceback, and the last lines name the problem
    unclear    exit status != 0, no traceback, but the last lines do not name the problem
    traceback  a Python traceback in the output
    crash      killed by a signal (a segfault, an abort)
    silent     exit status 0: the error went unnoticed
    hang       still running after the case's timeout
    lost       (a fault case) a result no longer loads, a temp file is left, or the next run fails

    python tools/bad_inputs.py                 # every case (~5 minutes on 2 CPU cores)
    python tools/bad_inputs.py --list          # the cases, without running them
    python tools/bad_inputs.py --only sample.py 'train.py: beta'   # the cases whose name has one of these
    python tools/bad_inputs.py --jobs=4 --timeout=60

It first builds tiny fixtures in a temporary folder (a prepared corpus, a SentencePiece tokenizer,
a 2-step checkpoint, its Hugging Face export, JSONL files, broken copies of each), then runs the
cases two at a time, each in its own empty folder (so nothing is written into the repository),
one thread each and offline. It prints one line per case that is not `clear` and a table of the
counts, and exits with 1 when any case is not `clear`.

A case is (name, argv, names): argv is the script and its arguments, with {fixture} paths filled
in ({case} is the case's own folder, {new} a path in it that does not exist yet, {missing} one
that never will); names is what the error message must mention, '|'-separated alternatives
(case-insensitive), looked for in the last lines of the output.
"""
import gzip
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from mirim.configurator import settings  # noqa: E402
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', WANDB_MODE='disabled', HF_HUB_OFFLINE='1',
           TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false', PYTHONUNBUFFERED='1',
           TQDM_DISABLE='1')
OUTCOMES = ['clear', 'unclear', 'traceback', 'crash', 'silent', 'hang', 'lost']

# -----------------------------------------------------------------------------
# the commands, each a valid call that the cases below break in one place

TRAIN = ['train.py', '--model=tiny', '--device=cpu', '--max_iters=2', '--eval_interval=2', '--eval_iters=1',
         '--log_interval=1', '--batch_size=2', '--block_size=32', '--data_dir={data}', '--out_dir={new}']
SAMPLE = ['sample.py', '--out_dir={out}', '--device=cpu', '--max_new_tokens=8']
EVAL = ['eval.py', '--out_dir={out}', '--device=cpu', '--output={case}/eval.json']
EXPORT = ['export.py', '--out_dir={out}', '--dest={new}']
CLASSIFY = ['classify.py', '--init_from={out}', '--train_file={cls_train}', '--test_file={cls_test}',
            '--out_dir={new}', '--device=cpu', '--epochs=1', '--batch_size=4']
PREPARE = ['data/prepare.py', '--input', '{text}', '--tokenizer', 'bytes', '--out', '{new}']
CHAT = ['data/prepare_chat.py', '--input', '{chat}', '--tokenizer', 'bytes', '--out', '{new}']
TOKENIZER = ['tokenizer.py', '--input', '{text}', '--vocab_size', '300', '--num_threads', '1',
             '--out', '{new}/tokenizer.model']
PLAN = ['plan.py', '--model=demo']
PLOT = ['plot.py', '{out}', '--output={case}/runs.png']
BENCH = ['bench.py', '--device=cpu', '--what=generate', '--repeats=1', '--new_tokens=4', '--prompt_tokens=4',
         '--vocab_size=256', '--n_embd=32', '--n_layer=1', '--n_head=2', '--n_kv_head=1', '--ffn_hidden=64',
         '--block_size=64', '--batch_size=1']
BIBLIA = ['data/biblia/prepare.py', '--lang', 'pt', '--books', '1,40', '--max_chapters', '2', '--vocab_size', '500',
          '--out', '{new}']
TASKS = ['data/biblia/make_tasks.py', 'classify', '--train_per_label', '10', '--test_per_label', '5', '--out', '{new}']
DPO = ['dpo.py', '--init_from={sft}', '--data_dir={prefdata}', '--out_dir={new}', '--device=cpu', '--max_iters=2',
       '--eval_interval=2', '--batch_size=4']
PREF = ['data/prepare_pref.py', '--input', '{pairs}', '--tokenizer', 'bytes', '--out', '{new}']
GGUF = ['export.py', '--format=gguf', '--out_dir={out}', '--dest={new}']
SERVE_ONE = ['serve.py', '--out_dir={out}', '--device=cpu', '--port=0', '--quiet']  # as SERVE below
# the commands of the fault cases: each writes into {run} (a fresh copy of a fixture's result, or a new folder)
RESUME = TRAIN[:-1] + ['--out_dir={run}', '--init_from=resume', '--max_iters=4', '--eval_interval=1']
TRAIN_RUN = TRAIN[:-1] + ['--out_dir={run}']
DPO_RUN = DPO[:3] + ['--out_dir={run}'] + DPO[4:]
DPO_RESUME = DPO_RUN + ['--init_from=resume', '--max_iters=4', '--eval_interval=1']
CLASSIFY_RUN = CLASSIFY[:4] + ['--out_dir={run}'] + CLASSIFY[5:]
PREPARE_RUN = PREPARE[:-1] + ['{run}']
PREF_RUN = PREF[:-1] + ['{run}']
EXPORT_RUN = EXPORT[:-1] + ['--dest={run}']
GGUF_RUN = GGUF[:-1] + ['--dest={run}']
TOKENIZER_RUN = TOKENIZER[:-1] + ['{run}/tokenizer.model']


def fault(kind, at, argv, previous, result):
    """A fault case's argv: kind 'KILL' or 'TERM' sent when the command renames a file whose path matches the
    regex `at` into place; 'FULL': its folder has `at` bytes of room beyond the previous result. previous: the
    fixture whose copy is {run} (None: {run} is new); result: what {run} holds, checked to load afterwards."""
    return ['FAULT', dict(kind=kind, at=at, argv=argv, previous=previous, result=result)]


NOWHERE = '--base_url=http://127.0.0.1:9/v1'  # no endpoint: these cases must stop before a request
JUDGE = ['judge.py', '--samples={cls_train}', NOWHERE, '--model=j', '--retries=0', '--output={case}/scores.json']
SYNTH = ['data/synth.py', '--lang', '{repo}/data/synth/pt', '--n', '2', NOWHERE, '--model=m', '--retries=0',
         '--out', '{case}/stories.jsonl']

# -----------------------------------------------------------------------------
# the cases: (name, argv, what the message must name)

CASES = [
    # train.py: config keys and values
    ('train.py: unknown key', TRAIN + ['--lerning_rate=1e-3'], 'lerning_rate'),
    ('train.py: text for an int', TRAIN + ['--batch_size=abc'], 'batch_size'),
    ('train.py: key without =', TRAIN + ['--batch_size'], 'batch_size'),
    ('train.py: key without dashes', TRAIN + ['batch_size=4'], 'batch_size'),
    ('train.py: batch_size=0', TRAIN + ['--batch_size=0'], 'batch_size'),
    ('train.py: batch_size=-1', TRAIN + ['--batch_size=-1'], 'batch_size'),
    ('train.py: max_iters=-1', TRAIN + ['--max_iters=-1'], 'max_iters'),
    ('train.py: learning_rate=nan', TRAIN + ["--learning_rate=float('nan')"], 'learning_rate'),
    ('train.py: learning_rate=-1', TRAIN + ['--learning_rate=-1.0'], 'learning_rate|learning rate'),
    ('train.py: learning_rate=1e400 (inf)', TRAIN + ['--learning_rate=1e400'], 'learning_rate'),
    ('train.py: min_lr=-1', TRAIN + ['--min_lr=-1.0'], 'min_lr|learning rate'),
    ('train.py: block_size=0', TRAIN + ['--block_size=0'], 'block_size'),
    ('train.py: block_size longer than the val split', TRAIN + ['--block_size=5000'], 'block_size|val'),
    ('train.py: gradient_accumulation_steps=0', TRAIN + ['--gradient_accumulation_steps=0'], 'gradient_accumulation'),
    ('train.py: warmup_iters=-1', TRAIN + ['--warmup_iters=-1'], 'warmup_iters'),
    ('train.py: lr_decay_iters=-1', TRAIN + ['--lr_decay_iters=-1'], 'lr_decay_iters'),
    ('train.py: wsd_decay_fraction=2', TRAIN + ['--lr_schedule=wsd', '--wsd_decay_fraction=2.0'], 'wsd_decay_fraction'),
    ('train.py: grad_clip=-1', TRAIN + ['--grad_clip=-1.0'], 'grad_clip'),
    ('train.py: weight_decay=-1', TRAIN + ['--weight_decay=-1.0'], 'weight_decay'),
    ('train.py: beta1=1.5', TRAIN + ['--beta1=1.5'], 'beta1'),
    ('train.py: beta2=-0.1', TRAIN + ['--beta2=-0.1'], 'beta2'),
    ('train.py: max_time=-5', TRAIN + ['--max_time=-5'], 'max_time'),
    ('train.py: eval_interval=0', TRAIN + ['--eval_interval=0'], 'eval_interval'),
    ('train.py: eval_iters=0', TRAIN + ['--eval_iters=0'], 'eval_iters'),
    ('train.py: log_interval=0', TRAIN + ['--log_interval=0'], 'log_interval'),
    ('train.py: dropout=1.5', TRAIN + ['--dropout=1.5'], 'dropout'),
    ('train.py: ddp_timeout=0', TRAIN + ['--ddp_timeout=0'], 'ddp_timeout'),
    ('train.py: device_peak_flops=-1', TRAIN + ['--device_peak_flops=-1'], 'device_peak_flops|peak'),
    ('train.py: compile=maybe', TRAIN + ['--compile=maybe'], 'compile'),
    ('train.py: lr_schedule=exponential', TRAIN + ['--lr_schedule=exponential'], 'lr_schedule'),
    ('train.py: unknown model preset', TRAIN + ['--model=gpt5'], 'gpt5|model'),
    ('train.py: unknown activation', TRAIN + ['--activation=relu'], 'activation|relu'),
    ('train.py: n_head does not divide n_embd', TRAIN + ['--n_head=3'], 'n_head|n_embd'),
    ('train.py: n_kv_head does not divide n_head', TRAIN + ['--n_head=4', '--n_kv_head=3'], 'n_kv_head'),
    ('train.py: n_layer=0', TRAIN + ['--n_layer=0'], 'n_layer'),
    ('train.py: rope_theta=-1', TRAIN + ['--rope_theta=-1.0'], 'rope_theta'),
    ('train.py: vocab_size smaller than the data', TRAIN + ['--vocab_size=10'], 'vocab'),
    ('train.py: unknown device', TRAIN + ['--device=tpu'], 'device'),
    ('train.py: cuda without a GPU', TRAIN + ['--device=cuda'], 'cuda'),
    ('train.py: unknown dtype', TRAIN + ['--dtype=float64'], 'dtype'),
    ('train.py: float16 on CPU', TRAIN + ['--dtype=float16'], 'float16'),
    # train.py: config files
    ('train.py: config file missing', ['train.py', '{missing}.py'], 'missing'),
    ('train.py: config file is a directory', ['train.py', '{emptydir}'], 'directory'),
    ('train.py: config file syntax error', ['train.py', '{cfg_syntax}'], 'syntax'),
    ('train.py: config file NameError', ['train.py', '{cfg_nameerror}'], 'nameerror|undefined_name'),
    ('train.py: config file not UTF-8', ['train.py', '{cfg_latin1}'], 'utf-8'),
    ('train.py: config file sets an unknown key', ['train.py', '{cfg_unknown}'], 'lerning_rate'),
    ('train.py: config file sets a wrong type', ['train.py', '{cfg_badtype}'], 'batch_size'),
    ('train.py: README demo config with a bad override',
     ['train.py', '{repo}/config/train_biblia_pt.py', '--batch_size=-16'], 'batch_size'),
    # train.py: data
    ('train.py: data_dir missing', TRAIN + ['--data_dir={missing}'], 'missing|meta.json'),
    ('train.py: data_dir is a file', TRAIN + ['--data_dir={text}'], 'corpus.txt|meta.json|directory'),
    ('train.py: data_dir is an empty folder', TRAIN + ['--data_dir={emptydir}'], 'meta.json|emptydir'),
    ('train.py: meta.json is not JSON', TRAIN + ['--data_dir={data_badmeta}'], 'meta.json'),
    ('train.py: meta.json without its shards', TRAIN + ['--data_dir={data_noshards}'], 'train_000000.bin|shard'),
    ('train.py: shard cut short', TRAIN + ['--data_dir={data_truncated}'], 'truncated|size|bytes'),
    ('train.py: shard with a wrong magic number', TRAIN + ['--data_dir={data_badmagic}'], 'magic|not a mirim shard'),
    ('train.py: token ids >= vocab under a valid header', TRAIN + ['--data_dir={data_badids}'], 'vocab|token id'),
    # train.py: outputs, init_from
    ('train.py: out_dir under a file', TRAIN + ['--out_dir={file}/out'], 'plain.txt|directory|out_dir'),
    ('train.py: out_dir is a file', TRAIN + ['--out_dir={file}'], 'plain.txt|directory|out_dir'),
    ('train.py: scratch run into an out_dir with a checkpoint', TRAIN + ['--out_dir={out_scratch}'],
     'ckpt.pt|checkpoint|resume'),
    ('train.py: resume without a checkpoint', TRAIN + ['--init_from=resume'], 'ckpt.pt|checkpoint'),
    ('train.py: resume on another tokenizer\'s data', TRAIN + ['--init_from=resume', '--out_dir={out_resume}',
                                                               '--data_dir={spdata}'], 'tokenizer|vocab_size'),
    ('train.py: init_from missing', TRAIN + ['--init_from={missing}'], 'missing'),
    ('train.py: init_from a text file', TRAIN + ['--init_from={text}'], 'corpus.txt|checkpoint'),
    ('train.py: init_from a dict that is no checkpoint', TRAIN + ['--init_from={notckpt}'], 'notckpt|checkpoint'),
    ('train.py: init_from with another tokenizer\'s data', TRAIN + ['--init_from={out}', '--data_dir={spdata}'],
     'tokenizer'),
    ('train.py: init_from a broken HF folder', TRAIN + ['--init_from={hf_badconfig}'], 'config.json'),
    ('train.py: init_from an HF folder without weights', TRAIN + ['--init_from={hf_noweights}'], 'safetensors|weights'),
    ('train.py: init_from NaN weights', TRAIN + ['--init_from={nan_ckpt}'], 'nan|finite'),
    ('train.py: preference pairs as data', TRAIN + ['--data_dir={prefdata}'], 'preference|dpo.py'),
    ('train.py: chat data without its masks', TRAIN + ['--data_dir={chat_nomasks}'], 'mask.bin'),
    ('train.py: a shard that is a folder', TRAIN + ['--data_dir={data_shard_dir}'], 'train_000000.bin'),
    ('train.py: meta.json is a JSON list', TRAIN + ['--data_dir={data_meta_list}'], 'meta.json'),
    ('train.py: vocab_size a string in meta.json', TRAIN + ['--data_dir={data_vocab_str}'], 'vocab_size'),
    ('train.py: out_dir empty', TRAIN + ['--out_dir='], 'out_dir is empty'),
    ('train.py: config file that imports, with a bad override', ['train.py', '{cfg_import}', '--batch_size=0'],
     'batch_size'),

    # sample.py
    ('sample.py: out_dir missing', SAMPLE + ['--out_dir={missing}'], 'missing'),
    ('sample.py: out_dir is an empty folder', SAMPLE + ['--out_dir={emptydir}'], 'emptydir|ckpt.pt|checkpoint'),
    ('sample.py: out_dir is a text file', SAMPLE + ['--out_dir={text}'], 'corpus.txt|checkpoint'),
    ('sample.py: out_dir is a tokenizer model', SAMPLE + ['--out_dir={sp_model}'], 'tokenizer.model|checkpoint'),
    ('sample.py: a dict that is no checkpoint', SAMPLE + ['--out_dir={notckpt}'], 'notckpt|checkpoint'),
    ('sample.py: best.pt missing', SAMPLE + ['--out_dir={out_nobest}', '--checkpoint=best.pt'], 'best.pt'),
    ('sample.py: checkpoint name missing', SAMPLE + ['--checkpoint=nope.pt'], 'nope.pt'),
    ('sample.py: HF folder with a broken config.json', SAMPLE + ['--out_dir={hf_badconfig}'], 'config.json'),
    ('sample.py: HF folder without weights', SAMPLE + ['--out_dir={hf_noweights}'], 'safetensors|weights'),
    ('sample.py: NaN weights', SAMPLE + ['--out_dir={nan_ckpt}'], 'nan|finite'),
    ('sample.py: model_config without tie_embeddings', SAMPLE + ['--out_dir={notie_ckpt}'], 'tie_embeddings'),
    ('sample.py: HF folder with a cut model.safetensors', SAMPLE + ['--out_dir={hf_cut}'], 'model.safetensors'),
    ('sample.py: HF config.json with num_hidden_layers a string', SAMPLE + ['--out_dir={hf_layers_str}'],
     'num_hidden_layers'),
    ('sample.py: num_samples=0', SAMPLE + ['--num_samples=0'], 'num_samples'),
    ('sample.py: max_new_tokens=-5', SAMPLE + ['--max_new_tokens=-5'], 'max_new_tokens'),
    ('sample.py: temperature=-1', SAMPLE + ['--temperature=-1.0'], 'temperature'),
    ('sample.py: temperature=nan', SAMPLE + ["--temperature=float('nan')"], 'temperature'),
    ('sample.py: top_k=-1', SAMPLE + ['--top_k=-1'], 'top_k'),
    ('sample.py: top_p=0', SAMPLE + ['--top_p=0.0'], 'top_p'),
    ('sample.py: top_p=1.5', SAMPLE + ['--top_p=1.5'], 'top_p'),
    ('sample.py: repetition_penalty=0', SAMPLE + ['--repetition_penalty=0.0'], 'repetition_penalty'),
    ('sample.py: batch_size=0', SAMPLE + ['--batch_size=0', '--start=FILE:{prompts}'], 'batch_size'),
    ('sample.py: seed is text', SAMPLE + ['--seed=abc'], 'seed'),
    ('sample.py: unknown format', SAMPLE + ['--format=xml'], 'format'),
    ('sample.py: output under a file', SAMPLE + ['--output={file}/samples.txt'], 'plain.txt|samples.txt'),
    ('sample.py: output is a folder', SAMPLE + ['--output={emptydir}'], 'emptydir|directory'),
    ('sample.py: output onto a checkpoint', SAMPLE + ['--output={ckpt}'], 'overwrite'),
    ('sample.py: prompts file missing', SAMPLE + ['--start=FILE:{missing}.txt'], 'missing'),
    ('sample.py: prompts file empty', SAMPLE + ['--start=FILE:{empty}'], 'empty.txt|no prompts'),
    ('sample.py: prompts file not UTF-8', SAMPLE + ['--start=FILE:{binary}'], 'utf-8|not text'),
    ('sample.py: prompts file is a folder', SAMPLE + ['--start=FILE:{emptydir}'], 'emptydir|directory'),
    ('sample.py: chat on a model without a template', SAMPLE + ['--chat'], 'chat template|chat_template'),
    ('sample.py: unknown chat template', SAMPLE + ['--chat', '--chat_template=llama3'], 'llama3|template'),
    ('sample.py: unknown device', SAMPLE + ['--device=tpu'], 'device'),
    ('sample.py: unknown dtype', SAMPLE + ['--dtype=float64'], 'dtype'),
    ('sample.py: unknown key', SAMPLE + ['--temprature=0.5'], 'temprature'),
    ('sample.py: README command with top_k as text', ['sample.py', '--out_dir={out}', '--start=No princípio',
                                                      '--num_samples=3', '--top_k=fifty'], 'top_k'),

    # eval.py
    ('eval.py: out_dir missing', EVAL + ['--out_dir={missing}'], 'missing'),
    ('eval.py: checkpoint is a text file', EVAL + ['--checkpoint={text}'], 'corpus.txt|checkpoint'),
    ('eval.py: a dict that is no checkpoint', EVAL + ['--checkpoint={notckpt}'], 'notckpt|checkpoint'),
    ('eval.py: NaN weights', EVAL + ['--checkpoint={nan_ckpt}'], 'nan|finite'),
    ('eval.py: text_file missing', EVAL + ['--text_file={missing}.txt'], 'missing'),
    ('eval.py: text_file empty', EVAL + ['--text_file={empty}'], 'empty'),
    ('eval.py: text_file not UTF-8', EVAL + ['--text_file={binary}'], 'utf-8|not text'),
    ('eval.py: text_file is a folder', EVAL + ['--text_file={emptydir}'], 'emptydir|directory'),
    ('eval.py: unknown task', EVAL + ['--task=hellaswag'], 'hellaswag|task'),
    ('eval.py: unknown biblia language', EVAL + ['--task=biblia-xx'], 'xx'),
    ('eval.py: task file missing', EVAL + ['--task={missing}.jsonl'], 'missing'),
    ('eval.py: task file malformed JSON', EVAL + ['--task={notjson}'], 'notjson|json'),
    ('eval.py: task record without gold', EVAL + ['--task={mc_nogold}'], 'gold'),
    ('eval.py: task gold out of range', EVAL + ['--task={mc_gold_oob}'], 'gold'),
    ('eval.py: task with no choices', EVAL + ['--task={mc_nochoices}'], 'choices'),
    ('eval.py: task choices a string', EVAL + ['--task={mc_choices_str}'], 'choices'),
    ('eval.py: task file empty', EVAL + ['--task={empty_jsonl}'], 'empty|no examples'),
    ('eval.py: data_dir missing', EVAL + ['--data_dir={missing}'], 'missing'),
    ('eval.py: data_dir of another tokenizer', EVAL + ['--data_dir={spdata}'], 'tokenizer'),
    ('eval.py: data_dir with ids >= vocab', EVAL + ['--data_dir={data_badids}'], 'vocab|token id'),
    ('eval.py: unknown split', EVAL + ['--split=test'], 'test|split'),
    ('eval.py: batch_size=0', EVAL + ['--batch_size=0'], 'batch_size'),
    ('eval.py: block_size=-1', EVAL + ['--block_size=-1'], 'block_size'),
    ('eval.py: block_size longer than the model', EVAL + ['--block_size=100000'], 'block_size'),
    ('eval.py: max_tokens=-1', EVAL + ['--max_tokens=-1'], 'max_tokens'),
    ('eval.py: n=-1', EVAL + ['--task={mc}', '--n=-1'], "'n'|--n|n="),
    ('eval.py: task and text_file together', EVAL + ['--task={mc}', '--text_file={text}'], 'task|text_file'),
    ('eval.py: output under a file', EVAL + ['--output={file}/eval.json'], 'plain.txt|eval.json'),
    ('eval.py: output onto a checkpoint', EVAL + ['--output={ckpt}'], 'overwrite'),
    ('eval.py: unknown device', EVAL + ['--device=tpu'], 'device'),
    ('eval.py: unknown key', EVAL + ['--tsk=x'], 'tsk'),

    # export.py
    ('export.py: no dest', ['export.py', '--out_dir={out}'], 'dest'),
    ('export.py: out_dir missing', EXPORT + ['--out_dir={missing}'], 'missing'),
    ('export.py: out_dir is a text file', EXPORT + ['--out_dir={text}'], 'corpus.txt|checkpoint'),
    ('export.py: a dict that is no checkpoint', EXPORT + ['--out_dir={notckpt}'], 'notckpt|checkpoint'),
    ('export.py: checkpoint name missing', EXPORT + ['--checkpoint=nope.pt'], 'nope.pt'),
    ('export.py: unknown dtype', EXPORT + ['--dtype=int8'], 'dtype|int8'),
    ('export.py: dest under a file', EXPORT + ['--dest={file}/hf'], 'plain.txt|dest'),
    ('export.py: dest is a file', EXPORT + ['--dest={file}'], 'plain.txt|dest'),
    ('export.py: check_tokenizer=maybe', EXPORT + ['--check_tokenizer=maybe'], 'check_tokenizer'),
    ('export.py: NaN weights', EXPORT + ['--out_dir={nan_ckpt}'], 'nan|finite'),
    ('export.py: dest holds an export', EXPORT + ['--dest={hf}'], 'overwrite'),
    ('export.py: dest is the run folder, overwrite', EXPORT + ['--dest={out}', '--overwrite'], 'training run'),
    ('export.py: gguf dest is the run folder', EXPORT + ['--format=gguf', '--dest={out}'], 'training run'),
    ('export.py: gguf dest is a file', EXPORT + ['--format=gguf', '--dest={file}'], 'plain.txt'),

    # classify.py
    ('classify.py: init_from missing', CLASSIFY + ['--init_from={missing}'], 'missing'),
    ('classify.py: init_from a text file', CLASSIFY + ['--init_from={text}'], 'corpus.txt|checkpoint'),
    ('classify.py: init_from NaN weights', CLASSIFY + ['--init_from={nan_ckpt}'], 'nan|finite'),
    ('classify.py: init_from a classifier of other labels', CLASSIFY + ['--init_from={cls_other}'], 'labels'),
    ('classify.py: train_file missing', CLASSIFY + ['--train_file={missing}.jsonl'], 'missing'),
    ('classify.py: train_file empty', CLASSIFY + ['--train_file={empty_jsonl}'], 'empty'),
    ('classify.py: train_file malformed JSON', CLASSIFY + ['--train_file={notjson}'], 'notjson|json'),
    ('classify.py: train_file not UTF-8', CLASSIFY + ['--train_file={binary}'], 'utf-8|not text'),
    ('classify.py: records without a label', CLASSIFY + ['--train_file={cls_nolabel}'], 'label'),
    ('classify.py: one label only', CLASSIFY + ['--train_file={cls_onelabel}'], 'label'),
    ('classify.py: test label unseen in train', CLASSIFY + ['--test_file={cls_unseen}'], 'label|zebra'),
    ('classify.py: unknown text_field', CLASSIFY + ['--text_field=body'], 'body'),
    ('classify.py: epochs=0', CLASSIFY + ['--epochs=0'], 'epochs'),
    ('classify.py: batch_size=0', CLASSIFY + ['--batch_size=0'], 'batch_size'),
    ('classify.py: learning_rate=-1', CLASSIFY + ['--learning_rate=-1.0'], 'learning_rate'),
    ('classify.py: max_length=-1', CLASSIFY + ['--max_length=-1'], 'max_length'),
    ('classify.py: warmup_fraction=2', CLASSIFY + ['--warmup_fraction=2.0'], 'warmup_fraction'),
    ('classify.py: out_dir under a file', CLASSIFY + ['--out_dir={file}/cls'], 'plain.txt|out_dir'),
    ('classify.py: out_dir empty', CLASSIFY + ['--out_dir='], 'out_dir is empty'),
    ('classify.py: unknown device', CLASSIFY + ['--device=tpu'], 'device'),
    ('classify.py: freeze_backbone=maybe', CLASSIFY + ['--freeze_backbone=maybe'], 'freeze_backbone'),

    # data/prepare.py
    ('prepare.py: no arguments', ['data/prepare.py'], 'required|--tokenizer'),
    ('prepare.py: misspelt flag', PREPARE + ['--ovewrite'], 'overwrite'),
    ('prepare.py: option without its value', PREPARE[:-1], '--out'),
    ('prepare.py: input missing', PREPARE[:2] + ['{missing}.txt'] + PREPARE[3:], 'missing'),
    ('prepare.py: input empty', PREPARE[:2] + ['{empty}'] + PREPARE[3:], 'empty|no documents'),
    ('prepare.py: input an empty folder', PREPARE[:2] + ['{emptydir}'] + PREPARE[3:], 'emptydir|no'),
    ('prepare.py: input not UTF-8', PREPARE[:2] + ['{binary}'] + PREPARE[3:], 'utf-8|not text'),
    ('prepare.py: input Latin-1 text', PREPARE[:2] + ['{latin1}'] + PREPARE[3:], 'warn:latin1.txt|utf-8'),
    ('prepare.py: JSONL without the text field', PREPARE[:2] + ['{cls_train}'] + PREPARE[3:] + ['--text_field=body'],
     'body'),
    ('prepare.py: JSONL malformed', PREPARE[:2] + ['{notjson}'] + PREPARE[3:], 'notjson|json'),
    ('prepare.py: input and hf_dataset together', PREPARE + ['--hf_dataset=wikitext'], 'hf_dataset'),
    ('prepare.py: hf_dataset offline', ['data/prepare.py', '--hf_dataset=no/such-set', '--tokenizer', 'bytes',
                                        '--out', '{new}'], 'no/such-set|datasets'),
    ('prepare.py: data_files without hf_dataset', PREPARE + ['--data_files', '{missing}'], 'data_files'),
    ('prepare.py: hf_dataset data_files missing', ['data/prepare.py', '--hf_dataset=parquet', '--data_files', '{missing}',
                                                   '--tokenizer', 'bytes', '--out', '{new}'], 'parquet|datasets'),
    ('prepare.py: unknown tokenizer spec', PREPARE[:4] + ['byte'] + PREPARE[5:], 'byte'),
    ('prepare.py: train:abc', PREPARE[:4] + ['train:abc'] + PREPARE[5:], 'train:'),
    ('prepare.py: train:0', PREPARE[:4] + ['train:0'] + PREPARE[5:], 'vocab|train:0'),
    ('prepare.py: train:-5', PREPARE[:4] + ['train:-5'] + PREPARE[5:], 'vocab|train:-5'),
    ('prepare.py: tiktoken offline', PREPARE[:4] + ['tiktoken:cl100k_base'] + PREPARE[5:], 'tiktoken|cl100k'),
    ('prepare.py: tiktoken ranks file malformed', PREPARE[:4] + ['tiktoken:{bad_tiktoken}'] + PREPARE[5:],
     'bad.tiktoken|ranks'),
    ('prepare.py: tokenizer a checkpoint', PREPARE[:4] + ['{ckpt}'] + PREPARE[5:], 'ckpt.pt|tokenizer'),
    ('prepare.py: tokenizer a text file', PREPARE[:4] + ['{text}'] + PREPARE[5:], 'corpus.txt|tokenizer'),
    ('prepare.py: tokenizer file missing', PREPARE[:4] + ['{missing}.model'] + PREPARE[5:], 'missing'),
    ('prepare.py: val_fraction=1.5', PREPARE + ['--val_fraction=1.5'], 'val_fraction'),
    ('prepare.py: val_fraction=-0.1', PREPARE + ['--val_fraction=-0.1'], 'val_fraction'),
    ('prepare.py: val_fraction=nan', PREPARE + ['--val_fraction=nan'], 'val_fraction'),
    ('prepare.py: shard_tokens=0', PREPARE + ['--shard_tokens=0'], 'shard_tokens'),
    ('prepare.py: shard_tokens=-1', PREPARE + ['--shard_tokens=-1'], 'shard_tokens'),
    ('prepare.py: num_proc=0', PREPARE + ['--num_proc=0'], 'num_proc'),
    ('prepare.py: sample_bytes=0', PREPARE[:4] + ['train:300'] + PREPARE[5:] + ['--sample_bytes=0'], 'sample_bytes'),
    ('prepare.py: unknown doc_per', PREPARE + ['--doc_per=page'], 'doc_per'),
    ('prepare.py: out under a file', PREPARE[:6] + ['{file}/data'], 'plain.txt'),
    ('prepare.py: out is a file', PREPARE[:6] + ['{file}'], 'plain.txt'),
    ('prepare.py: input a cut .gz', PREPARE[:2] + ['{gz_cut}'] + PREPARE[3:], 'corpus.txt.gz'),
    ('prepare.py: README command, vocab too big for the corpus', PREPARE[:4] + ['train:8192'] + PREPARE[5:],
     'vocab|8192'),

    # data/prepare_chat.py
    ('prepare_chat.py: input missing', CHAT[:2] + ['{missing}.jsonl'] + CHAT[3:], 'missing'),
    ('prepare_chat.py: input empty', CHAT[:2] + ['{empty_jsonl}'] + CHAT[3:], 'empty|no conversations'),
    ('prepare_chat.py: input malformed JSON', CHAT[:2] + ['{notjson}'] + CHAT[3:], 'notjson|json'),
    ('prepare_chat.py: input not UTF-8', CHAT[:2] + ['{binary}'] + CHAT[3:], 'utf-8|not text'),
    ('prepare_chat.py: records without messages', CHAT[:2] + ['{chat_nofield}'] + CHAT[3:], 'messages|prompt'),
    ('prepare_chat.py: unknown role', CHAT[:2] + ['{chat_badrole}'] + CHAT[3:], 'role|robot'),
    ('prepare_chat.py: empty messages', CHAT[:2] + ['{chat_nomessages}'] + CHAT[3:], 'messages|empty'),
    ('prepare_chat.py: unknown template', CHAT + ['--template=llama3'], 'template|llama3'),
    ('prepare_chat.py: aira template on a tokenizer without its tokens', CHAT + ['--template=aira'], 'instruction'),
    ('prepare_chat.py: tokenizer missing', CHAT[:4] + ['{missing}.model'] + CHAT[5:], 'missing'),
    ('prepare_chat.py: tokenizer a checkpoint', CHAT[:4] + ['{ckpt}'] + CHAT[5:], 'ckpt.pt|tokenizer'),
    ('prepare_chat.py: val_fraction=1.5', CHAT + ['--val_fraction=1.5'], 'val_fraction'),
    ('prepare_chat.py: shard_tokens=0', CHAT + ['--shard_tokens=0'], 'shard_tokens'),
    ('prepare_chat.py: val_input missing', CHAT + ['--val_input={missing}.jsonl'], 'missing'),
    ('prepare_chat.py: out under a file', CHAT[:6] + ['{file}/chat'], 'plain.txt'),

    # tokenizer.py
    ('tokenizer.py: input missing', TOKENIZER[:2] + ['{missing}.txt'] + TOKENIZER[3:], 'missing'),
    ('tokenizer.py: input empty', TOKENIZER[:2] + ['{empty}'] + TOKENIZER[3:], 'empty.txt|no text'),
    ('tokenizer.py: input not UTF-8', TOKENIZER[:2] + ['{binary}'] + TOKENIZER[3:], 'utf-8|not text'),
    ('tokenizer.py: input Latin-1 text', TOKENIZER[:2] + ['{latin1}'] + TOKENIZER[3:], 'warn:latin1.txt|utf-8'),
    ('tokenizer.py: vocab_size=0', TOKENIZER + ['--vocab_size', '0'], 'vocab_size'),
    ('tokenizer.py: vocab_size=-1', TOKENIZER + ['--vocab_size', '-1'], 'vocab_size'),
    ('tokenizer.py: vocab_size too big for the corpus', TOKENIZER + ['--vocab_size', '100000'], 'vocab'),
    ('tokenizer.py: vocab_size is text', TOKENIZER + ['--vocab_size', 'big'], 'vocab_size'),
    ('tokenizer.py: unknown model_type', TOKENIZER + ['--model_type', 'wordpiece'], 'model_type'),
    ('tokenizer.py: character_coverage=2', TOKENIZER + ['--character_coverage', '2'], 'character_coverage'),
    ('tokenizer.py: held_out_every=0', TOKENIZER + ['--held_out_every', '0'], 'held_out_every'),
    ('tokenizer.py: num_threads=0', TOKENIZER[:6] + ['0'] + TOKENIZER[7:], 'num_threads'),
    ('tokenizer.py: out under a file', TOKENIZER[:-1] + ['{file}/tokenizer.model'], 'plain.txt'),
    ('tokenizer.py: out is a folder', TOKENIZER[:-1] + ['{emptydir}'], 'emptydir|directory'),
    ('tokenizer.py: out holds a tokenizer', TOKENIZER[:-1] + ['{sp_model}'], 'overwrite'),
    ('tokenizer.py: out is a data set\'s tokenizer, overwrite', TOKENIZER[:-1] + ['{spdata}/tokenizer.model',
                                                                              '--overwrite'], 'prepared data set'),
    ('tokenizer.py: out is a .vocab', TOKENIZER[:-1] + ['{new}/tokenizer.vocab'], '.model'),

    # plan.py
    ('plan.py: unknown preset', ['plan.py', '--model=gpt5'], 'gpt5|model'),
    ('plan.py: params is text', ['plan.py', '--params=abc'], 'params'),
    ('plan.py: params=-1', ['plan.py', '--params=-1'], 'params'),
    ('plan.py: unknown gpu', PLAN + ['--gpu=TPU'], 'gpu|TPU'),
    ('plan.py: mfu=0', PLAN + ['--gpu=A100', '--mfu=0'], 'mfu'),
    ('plan.py: mfu=2', PLAN + ['--gpu=A100', '--mfu=2'], 'mfu'),
    ('plan.py: num_gpus=0', PLAN + ['--gpu=A100', '--num_gpus=0'], 'num_gpus'),
    ('plan.py: gpu_hour_price=-1', PLAN + ['--gpu=A100', '--gpu_hour_price=-1'], 'gpu_hour_price'),
    ('plan.py: tokens=-5', PLAN + ['--tokens=-5'], 'tokens'),
    ('plan.py: tokens_per_sec=-1', PLAN + ['--tokens_per_sec=-1'], 'tokens_per_sec'),
    ('plan.py: context=-1', PLAN + ['--context=-1'], 'context'),
    ('plan.py: log missing', PLAN + ['--log={missing}'], 'missing'),
    ('plan.py: log is not a log', PLAN + ['--log={text}'], 'corpus.txt|log'),
    ('plan.py: log without tokens/s', PLAN + ['--log={badlog}'], 'log|tokens'),
    ('plan.py: data_dir missing', PLAN + ['--data_dir={missing}'], 'missing'),
    ('plan.py: data_dir meta.json not JSON', PLAN + ['--data_dir={data_badmeta}'], 'meta.json'),
    ('plan.py: config file missing', ['plan.py', '{missing}.py'], 'missing'),
    ('plan.py: unknown train key', PLAN + ['--lerning_rate=1'], 'lerning_rate'),
    ('plan.py: batch_size=0', PLAN + ['--batch_size=0'], 'batch_size'),
    ('plan.py: README command with a bad price', ['plan.py', '{repo}/config/ttl_160m.py', '--gpu=A100',
                                                  '--gpu_hour_price=cheap'], 'gpu_hour_price'),

    # plot.py
    ('plot.py: no arguments', ['plot.py'], 'usage|runs'),
    ('plot.py: run folder missing', ['plot.py', '{missing}', '--output={case}/runs.png'], 'missing'),
    ('plot.py: folder without log.jsonl', ['plot.py', '{data}', '--output={case}/runs.png'], 'log.jsonl'),
    ('plot.py: log with nothing to plot', ['plot.py', '{badlog}', '--output={case}/runs.png'], 'nothing to plot|log'),
    ('plot.py: unknown option', PLOT + ['--colour=red'], 'colour'),
    ('plot.py: unknown x axis', PLOT + ['--x=time'], 'time|--x'),
    ('plot.py: output under a file', ['plot.py', '{out}', '--output={file}/runs.png'], 'plain.txt|runs.png'),
    ('plot.py: output is a folder', ['plot.py', '{out}', '--output={emptydir}'], 'emptydir|directory'),
    ('plot.py: output not an image', ['plot.py', '{out}', '--output={case}/runs.txt'], 'png|runs.txt'),
    ('plot.py: output holds an earlier plot', ['plot.py', '{out}', '--output={png}'], 'overwrite'),

    # judge.py
    ('judge.py: output holds earlier scores', JUDGE[:-1] + ['--output={file}'], 'overwrite'),
    ('judge.py: output is a folder', JUDGE[:-1] + ['--output={emptydir}'], 'emptydir|directory'),
    ('judge.py: output is the samples file, overwrite', JUDGE[:-1] + ['--output={cls_train}', '--overwrite'],
     'samples'),
    ('judge.py: endpoint down', JUDGE, 'cannot reach'),

    # data/synth.py
    ('synth.py: out is a checkpoint', SYNTH[:-1] + ['{ckpt}'], 'overwrite'),
    ('synth.py: out holds other JSONL', SYNTH[:-1] + ['{cls_train}'], 'overwrite'),
    ('synth.py: out is a folder, overwrite', SYNTH[:-1] + ['{emptydir}', '--overwrite'], 'directory'),
    ('synth.py: out is the prompts file, overwrite', ['data/synth.py', '--prompts', '{chat}', '--out', '{chat}',
                                                      NOWHERE, '--model=m', '--overwrite'], 'prompts'),
    ('synth.py: lang folder without words.json', SYNTH[:2] + ['{lang_nowords}'] + SYNTH[3:], 'words.json'),
    ('synth.py: prompts file with a line not JSON', ['data/synth.py', '--prompts', '{notjson}', '--out', '{new}',
                                                     NOWHERE, '--model=m'], 'notjson.jsonl:1'),
    ('synth.py: endpoint down', SYNTH, 'cannot reach'),

    # bench.py
    ('bench.py: unknown what', BENCH + ['--what=nope'], 'what|nope'),
    ('bench.py: repeats=0', BENCH + ['--repeats=0'], 'repeats'),
    ('bench.py: batch_size=0', BENCH[:2] + ['--what=train'] + BENCH[3:] + ['--batch_size=0'], 'batch_size'),
    ('bench.py: new_tokens=-1', BENCH + ['--new_tokens=-1'], 'new_tokens'),
    ('bench.py: unknown preset', BENCH + ['--model=gpt5'], 'gpt5|model'),
    ('bench.py: unknown dtype', BENCH + ['--dtype=float64'], 'dtype'),
    ('bench.py: unknown device', BENCH + ['--device=tpu'], 'device'),
    ('bench.py: unknown key', BENCH + ['--repeat=3'], 'repeat'),
    ('bench.py: unknown gguf type', BENCH + ['--what=gguf', '--gguf_types=q4_K'], 'gguf_types'),
    ('bench.py: gguf of a missing model', BENCH + ['--what=gguf', '--out_dir={case}/nowhere'], 'nowhere'),
    ('bench.py: n_head does not divide n_embd', BENCH + ['--n_head=3'], 'n_head|n_embd'),
    ('bench.py: vocab_size=0', BENCH + ['--vocab_size=0'], 'vocab_size'),
    ('bench.py: block_size shorter than the prompt', BENCH + ['--block_size=2'], 'block_size'),

    # data/biblia/prepare.py
    ('biblia/prepare.py: no language', ['data/biblia/prepare.py', '--out', '{new}'], 'lang'),
    ('biblia/prepare.py: unknown language', BIBLIA[:2] + ['xx'] + BIBLIA[3:], 'xx'),
    ('biblia/prepare.py: unknown translation', BIBLIA + ['--translation', 'Z'], 'Z|translation'),
    ('biblia/prepare.py: books is text', BIBLIA[:4] + ['genesis'] + BIBLIA[5:], 'books|genesis'),
    ('biblia/prepare.py: book 999', BIBLIA[:4] + ['999'] + BIBLIA[5:], '999'),
    ('biblia/prepare.py: max_chapters=-1', BIBLIA[:6] + ['-1'] + BIBLIA[7:], 'max_chapters'),
    ('biblia/prepare.py: vocab_size=-1', BIBLIA[:8] + ['-1'] + BIBLIA[9:], 'vocab'),
    ('biblia/prepare.py: num_proc=0', BIBLIA + ['--num_proc', '0'], 'num_proc'),
    ('biblia/prepare.py: out under a file', BIBLIA[:-1] + ['{file}/biblia'], 'plain.txt'),
    ('biblia/prepare.py: out holds a data set', BIBLIA[:-1] + ['{data}'], 'overwrite'),

    # data/biblia/make_tasks.py
    ('make_tasks.py: no task', ['data/biblia/make_tasks.py'], 'what|chat|classify'),
    ('make_tasks.py: unknown task', ['data/biblia/make_tasks.py', 'summarize'], 'summarize|choice'),
    ('make_tasks.py: classify, unknown language', TASKS + ['--lang', 'xx'], 'xx'),
    ('make_tasks.py: classify, train_per_label=0', TASKS[:3] + ['0'] + TASKS[4:], 'train_per_label'),
    ('make_tasks.py: classify, test_per_label=-1', TASKS[:5] + ['-1'] + TASKS[6:], 'test_per_label'),
    ('make_tasks.py: classify, unknown labels', TASKS + ['--task', 'author'], 'author|task'),
    ('make_tasks.py: classify, out under a file', TASKS[:-1] + ['{file}/cls'], 'plain.txt'),
    ('make_tasks.py: chat, unknown language', ['data/biblia/make_tasks.py', 'chat', '--lang', 'xx',
                                               '--tokenizer', 'bytes', '--out', '{new}'], 'xx'),
    ('make_tasks.py: chat, tokenizer missing', ['data/biblia/make_tasks.py', 'chat', '--tokenizer', '{missing}.model',
                                                '--out', '{new}'], 'missing'),
    ('make_tasks.py: chat, unknown template', ['data/biblia/make_tasks.py', 'chat', '--tokenizer', 'bytes',
                                               '--template', 'llama3', '--out', '{new}'], 'llama3|template'),
    ('make_tasks.py: classify, out holds a set', TASKS[:-1] + ['{cls_set}'], 'overwrite'),
    ('make_tasks.py: classify, out is a data set, overwrite', TASKS[:-1] + ['{data}', '--overwrite'],
     'prepared data set'),
    ('make_tasks.py: chat, out holds a data set', ['data/biblia/make_tasks.py', 'chat', '--tokenizer', '{sp_model}',
                                                   '--out', '{spdata}'], 'overwrite'),

    # dpo.py: its own settings, data of another kind, starting models of another kind, resume
    ('dpo.py: no init_from', DPO + ['--init_from='], 'init_from'),
    ('dpo.py: unknown key', DPO + ['--betta=0.2'], 'betta'),
    ('dpo.py: loss_type=kto', DPO + ['--loss_type=kto'], 'loss_type'),
    ('dpo.py: beta=0', DPO + ['--beta=0.0'], 'beta'),
    ('dpo.py: beta=nan', DPO + ["--beta=float('nan')"], 'beta'),
    ('dpo.py: label_smoothing=0.5', DPO + ['--label_smoothing=0.5'], 'label_smoothing'),
    ('dpo.py: label_smoothing with ipo', DPO + ['--loss_type=ipo', '--label_smoothing=0.1'], 'label_smoothing'),
    ('dpo.py: eval_pairs=-1', DPO + ['--eval_pairs=-1'], 'eval_pairs'),
    ('dpo.py: batch_size=0', DPO + ['--batch_size=0'], 'batch_size'),
    ('dpo.py: learning_rate=-1', DPO + ['--learning_rate=-1.0'], 'learning_rate'),
    ('dpo.py: data_dir missing', DPO + ['--data_dir={missing}'], 'missing'),
    ('dpo.py: pretraining data', DPO + ['--data_dir={data}'], 'preference'),
    ('dpo.py: chat data', DPO + ['--data_dir={chatdata}'], 'preference'),
    ('dpo.py: data of another tokenizer', DPO + ['--data_dir={spdata}'], 'tokenizer'),
    ('dpo.py: a base model', DPO + ['--init_from={base}'], 'warn:chat template'),
    ('dpo.py: a classifier as the start', DPO + ['--init_from={cls_other}'], 'classifier|classify.py'),
    ('dpo.py: pairs longer than the context', DPO + ['--init_from={out}'], 'context|max_length'),
    ('dpo.py: init_from a text file', DPO + ['--init_from={text}'], 'corpus.txt|checkpoint'),
    ('dpo.py: init_from NaN weights', DPO + ['--init_from={nan_ckpt}'], 'nan|finite'),
    ('dpo.py: out_dir is a file', DPO + ['--out_dir={file}'], 'plain.txt|out_dir'),
    ('dpo.py: scratch into a DPO run', DPO + ['--out_dir={dpo_run}'], 'resume'),
    ('dpo.py: resume without a checkpoint', DPO + ['--init_from=resume'], 'ckpt.pt|checkpoint'),
    ('dpo.py: resume with a cut reference.pt', DPO + ['--init_from=resume', '--out_dir={dpo_cutref}'],
     'reference.pt'),
    ('dpo.py: resume without reference.pt', DPO + ['--init_from=resume', '--out_dir={dpo_noref}'], 'reference.pt'),
    ('dpo.py: resume a train.py run', DPO + ['--init_from=resume', '--out_dir={sft_copy}'], 'train.py'),
    ('dpo.py: resume on other pairs', DPO + ['--init_from=resume', '--out_dir={dpo_otherdata}',
                                             '--data_dir={prefdata2}'], 'other data'),
    ('train.py: resume a dpo.py run', TRAIN + ['--init_from=resume', '--out_dir={dpo_copy}', '--data_dir={chatdata}',
                                               '--block_size=64'], 'dpo.py'),

    # data/prepare_pref.py
    ('prepare_pref.py: no arguments', ['data/prepare_pref.py'], 'input|out'),
    ('prepare_pref.py: input missing', PREF[:2] + ['{missing}.jsonl'] + PREF[3:], 'missing'),
    ('prepare_pref.py: input empty', PREF[:2] + ['{empty_jsonl}'] + PREF[3:], 'empty|no pairs'),
    ('prepare_pref.py: input malformed JSON', PREF[:2] + ['{notjson}'] + PREF[3:], 'notjson|json'),
    ('prepare_pref.py: input not UTF-8', PREF[:2] + ['{binary}'] + PREF[3:], 'utf-8|not text'),
    ('prepare_pref.py: a chat set given as pairs', PREF[:2] + ['{chat}'] + PREF[3:], 'chat.jsonl'),
    ('prepare_pref.py: a text corpus given as pairs', PREF[:2] + ['{text}'] + PREF[3:], 'corpus.txt'),
    ('prepare_pref.py: a classification set given as pairs', PREF[:2] + ['{cls_train}'] + PREF[3:], 'cls_train'),
    ('prepare_pref.py: chosen a number', PREF[:2] + ['{pairs_num}'] + PREF[3:], 'chosen'),
    ('prepare_pref.py: every pair identical', PREF[:2] + ['{pairs_same}'] + PREF[3:], 'same|identical'),
    ('prepare_pref.py: model and tokenizer', PREF + ['--model={sft}'], '--model|--tokenizer'),
    ('prepare_pref.py: model missing', ['data/prepare_pref.py', '--input', '{pairs}', '--model', '{missing}',
                                        '--out', '{new}'], 'missing'),
    ('prepare_pref.py: model an HF folder', ['data/prepare_pref.py', '--input', '{pairs}', '--model', '{hf}',
                                             '--out', '{new}'], 'hugging face|--tokenizer'),
    ('prepare_pref.py: model a text file', ['data/prepare_pref.py', '--input', '{pairs}', '--model', '{text}',
                                            '--out', '{new}'], 'corpus.txt|checkpoint'),
    ('prepare_pref.py: tokenizer a checkpoint', PREF[:4] + ['{ckpt}'] + PREF[5:], 'ckpt.pt|tokenizer'),
    ('prepare_pref.py: max_length=4', PREF + ['--max_length=4'], 'max_length'),
    ('prepare_pref.py: unknown template', PREF + ['--template=llama3'], 'template|llama3'),
    ('prepare_pref.py: aira template on a tokenizer without its tokens', PREF + ['--template=aira'], 'instruction'),
    ('prepare_pref.py: val_fraction=2', PREF + ['--val_fraction=2'], 'val_fraction'),
    ('prepare_pref.py: val_input missing', PREF + ['--val_input={missing}.jsonl'], 'missing'),
    ('prepare_pref.py: out holds a data set', PREF[:-1] + ['{data}'], 'overwrite'),
    ('prepare_pref.py: out is a file', PREF[:-1] + ['{file}'], 'plain.txt'),

    # data/synth.py (more)
    ('synth.py: neither lang nor prompts', ['data/synth.py', '--out', '{new}', NOWHERE], 'lang|prompts'),
    ('synth.py: lang and prompts', SYNTH + ['--prompts', '{chat}'], 'lang|prompts'),
    ('synth.py: no out', SYNTH[:-2], 'out'),
    ('synth.py: lang folder missing', SYNTH[:2] + ['{missing}'] + SYNTH[3:], 'missing'),
    ('synth.py: lang is a file', SYNTH[:2] + ['{file}'] + SYNTH[3:], 'plain.txt'),
    ('synth.py: words.json not JSON', SYNTH[:2] + ['{lang_badwords}'] + SYNTH[3:], 'words.json'),
    ('synth.py: prompt.txt names a list words.json lacks', SYNTH[:2] + ['{lang_noslot}'] + SYNTH[3:], 'colour'),
    ('synth.py: cleanup.json with a bad regex', SYNTH[:2] + ['{lang_badregex}'] + SYNTH[3:], 'cleanup.json'),
    ('synth.py: out of the other mode', SYNTH[:-1] + ['{generic_out}'], 'overwrite'),
    ('synth.py: out with a corrupt middle line', SYNTH[:-1] + ['{stories_badmid}'], 'stories_badmid.jsonl:2'),
    ('synth.py: prompts missing', ['data/synth.py', '--prompts', '{missing}.jsonl', '--out', '{new}', NOWHERE,
                                   '--model=m'], 'missing'),
    ('synth.py: prompts empty', ['data/synth.py', '--prompts', '{empty_jsonl}', '--out', '{new}', NOWHERE,
                                 '--model=m'], 'empty|no prompts'),
    ('synth.py: prompts not UTF-8', ['data/synth.py', '--prompts', '{binary}', '--out', '{new}', NOWHERE,
                                     '--model=m'], 'utf-8|not text'),
    ('synth.py: prompts records without a prompt', ['data/synth.py', '--prompts', '{chat_nofield}', '--out', '{new}',
                                                    NOWHERE, '--model=m'], 'prompt'),
    ('synth.py: n=-1', SYNTH + ['--n', '-1'], "'n'|--n|n="),
    ('synth.py: concurrency=0', SYNTH + ['--concurrency', '0'], 'concurrency'),
    ('synth.py: retries=-1', SYNTH + ['--retries=-1'], 'retries'),
    ('synth.py: timeout=0', SYNTH + ['--timeout=0'], 'timeout'),

    # judge.py (more)
    ('judge.py: no samples', ['judge.py', NOWHERE, '--model=j'], 'samples'),
    ('judge.py: samples missing', JUDGE[:1] + ['--samples={missing}.jsonl'] + JUDGE[2:], 'missing'),
    ('judge.py: samples empty', JUDGE[:1] + ['--samples={empty_jsonl}'] + JUDGE[2:], 'empty|no samples|no stories'),
    ('judge.py: samples with a line not JSON', JUDGE[:1] + ['--samples={notjson}'] + JUDGE[2:], 'notjson.jsonl'),
    ('judge.py: samples not UTF-8', JUDGE[:1] + ['--samples={binary}'] + JUDGE[2:], 'utf-8|not text'),
    ('judge.py: samples without text', JUDGE[:1] + ['--samples={chat_nofield}'] + JUDGE[2:], 'text'),
    ('judge.py: samples a folder', JUDGE[:1] + ['--samples={emptydir}'] + JUDGE[2:], 'emptydir|directory'),
    ('judge.py: rubric missing', JUDGE + ['--rubric={missing}.txt'], 'missing'),
    ('judge.py: criteria empty', JUDGE + ['--criteria='], 'criteria'),
    ('judge.py: concurrency=0', JUDGE + ['--concurrency=0'], 'concurrency'),
    ('judge.py: retries=-1', JUDGE + ['--retries=-1'], 'retries'),

    # export.py --format=gguf (more)
    ('export.py: gguf_type=q4_K', GGUF + ['--gguf_type=q4_K'], 'gguf_type'),
    ('export.py: gguf_type empty', GGUF + ['--gguf_type='], 'gguf_type'),
    ('export.py: unknown format', EXPORT + ['--format=onnx'], 'format|onnx'),
    ('export.py: gguf of a classifier', GGUF + ['--out_dir={cls_other}'], 'classifier'),
    ('export.py: gguf of NaN weights', GGUF + ['--out_dir={nan_ckpt}'], 'nan|finite'),
    ('export.py: gguf dest unwritable', GGUF[:-1] + ['--dest=/proc/self/gguf'], '/proc/self/gguf'),
    ('export.py: gguf dest holds a gguf', GGUF[:-1] + ['--dest={gguf}'], 'overwrite'),
    ('export.py: gguf of a missing checkpoint name', GGUF + ['--checkpoint=nope.pt'], 'nope.pt'),

    # faults at the writes: kill -9 or SIGTERM just before a file is renamed into place (its temp file written
    # whole), a full disk (a small tmpfs, or RLIMIT_FSIZE where none can be mounted) at a write. Clear = a full disk
    # is one line; afterwards every result in the folder still loads (the previous one, or none when it is new), the
    # same command run again works, and no temp file is left
    ('fault: train.py kill -9 at ckpt.pt', fault('KILL', r'ckpt\.pt$', RESUME, 'out', 'ckpt'), ''),
    ('fault: train.py SIGTERM at ckpt.pt', fault('TERM', r'ckpt\.pt$', RESUME, 'out', 'ckpt'), ''),
    ('fault: train.py kill -9 at best.pt', fault('KILL', r'best\.pt$', RESUME, 'out', 'ckpt'), ''),
    ('fault: train.py kill -9 at log.jsonl', fault('KILL', r'log\.jsonl$', RESUME, 'out', 'ckpt'), ''),
    ('fault: train.py full disk', fault('FULL', 200_000, RESUME, 'out', 'ckpt'), 'space|too large'),
    ('fault: train.py full disk, a new run', fault('FULL', 200_000, TRAIN_RUN, None, 'ckpt'), 'space|too large'),
    ('fault: dpo.py kill -9 at reference.pt', fault('KILL', r'reference\.pt$', DPO_RUN, None, 'ckpt'), ''),
    ('fault: dpo.py kill -9 at ckpt.pt', fault('KILL', r'ckpt\.pt$', DPO_RESUME, 'dpo_run', 'ckpt'), ''),
    ('fault: dpo.py SIGTERM at ckpt.pt', fault('TERM', r'ckpt\.pt$', DPO_RESUME, 'dpo_run', 'ckpt'), ''),
    ('fault: dpo.py full disk', fault('FULL', 200_000, DPO_RESUME, 'dpo_run', 'ckpt'), 'space|too large'),
    ('fault: classify.py kill -9 at classifier.pt', fault('KILL', r'classifier\.pt$', CLASSIFY_RUN, None, 'ckpt'),
     ''),
    ('fault: classify.py SIGTERM at classifier.pt', fault('TERM', r'classifier\.pt$', CLASSIFY_RUN, None, 'ckpt'),
     ''),
    ('fault: classify.py full disk', fault('FULL', 200_000, CLASSIFY_RUN, None, 'ckpt'), 'space|too large'),
    ('fault: prepare.py kill -9 at a shard', fault('KILL', r'train_000000\.bin$', PREPARE_RUN, None, 'data'), ''),
    ('fault: prepare.py kill -9 at meta.json', fault('KILL', r'meta\.json$', PREPARE_RUN, None, 'data'), ''),
    ('fault: prepare.py SIGTERM at a shard', fault('TERM', r'train_000000\.bin$', PREPARE_RUN, None, 'data'), ''),
    ('fault: prepare.py full disk', fault('FULL', 4_096, PREPARE_RUN, None, 'data'), 'space|too large'),
    ('fault: prepare.py --overwrite, kill -9 at meta.json', fault('KILL', r'meta\.json$', PREPARE_RUN + ['--overwrite'],
                                                                'data', 'data'), ''),
    ('fault: prepare_pref.py kill -9 at meta.json', fault('KILL', r'meta\.json$', PREF_RUN, None, 'data'), ''),
    ('fault: export.py kill -9 at model.safetensors', fault('KILL', r'model\.safetensors$', EXPORT_RUN, None, 'hf'),
     ''),
    ('fault: export.py kill -9 at config.json', fault('KILL', r'config\.json$', EXPORT_RUN, None, 'hf'), ''),
    ('fault: export.py full disk', fault('FULL', 100_000, EXPORT_RUN, None, 'hf'), 'space|too large'),
    ('fault: export.py gguf kill -9', fault('KILL', r'\.gguf$', GGUF_RUN, None, 'gguf'), ''),
    ('fault: export.py gguf full disk', fault('FULL', 100_000, GGUF_RUN, None, 'gguf'), 'space|too large'),
    ('fault: tokenizer.py kill -9 at tokenizer.model', fault('KILL', r'tokenizer\.model$', TOKENIZER_RUN, None,
                                                             'tokenizer'), ''),
    ('fault: tokenizer.py full disk', fault('FULL', 0, TOKENIZER_RUN, None, 'tokenizer'), 'space|too large'),

    # odd text: UTF-16 (with and without a byte-order mark), NUL bytes past the first 8 KB, damaged compressed files
    ('prepare.py: input UTF-16 with a BOM', PREPARE[:2] + ['{utf16_bom}'] + PREPARE[3:], 'utf16_bom.txt'),
    ('prepare.py: input UTF-16 BE without a BOM', PREPARE[:2] + ['{utf16_be}'] + PREPARE[3:], 'utf16_be.txt'),
    ('prepare.py: JSONL corpus in UTF-16', PREPARE[:2] + ['{utf16_cls}'] + PREPARE[3:], 'utf16_cls.jsonl'),
    ('prepare.py: NUL bytes after the first 8 KB', PREPARE[:2] + ['{nul_late}'] + PREPARE[3:], 'nul_late.txt:'),
    ('prepare.py: JSONL with NUL bytes after 8 KB', PREPARE[:2] + ['{nul_late_jsonl}'] + PREPARE[3:],
     'nul_late.jsonl:'),
    ('prepare.py: a Parquet page overwritten', PREPARE[:2] + ['{parquet_bad}'] + PREPARE[3:], 'bad.parquet'),
    ('prepare.py: a cut .jsonl.gz', PREPARE[:2] + ['{jsonl_gz_cut}'] + PREPARE[3:], 'cut.jsonl.gz'),
    ('prepare_chat.py: input UTF-16', CHAT[:2] + ['{utf16_chat}'] + CHAT[3:], 'utf16_chat.jsonl'),
    ('prepare_chat.py: input UTF-16 without a BOM', CHAT[:2] + ['{utf16le_chat}'] + CHAT[3:], 'utf16le_chat.jsonl'),
    ('prepare_chat.py: a Parquet page overwritten', CHAT[:2] + ['{parquet_chat_bad}'] + CHAT[3:], 'chat_bad.parquet'),
    ('prepare_pref.py: input UTF-16', PREF[:2] + ['{utf16_pairs}'] + PREF[3:], 'utf16_pairs.jsonl'),
    ('classify.py: train_file UTF-16', CLASSIFY + ['--train_file={utf16_cls}'], 'utf16_cls.jsonl'),
    ('classify.py: train_file UTF-16 without a BOM', CLASSIFY + ['--train_file={utf16le_cls}'], 'utf16le_cls.jsonl'),
    ('eval.py: task file UTF-16', EVAL + ['--task={utf16_mc}'], 'utf16_mc.jsonl'),
    ('eval.py: text_file UTF-16', EVAL + ['--text_file={utf16_bom}'], 'utf16_bom.txt'),
    ('sample.py: prompts file UTF-16', SAMPLE + ['--start=FILE:{utf16_bom}'], 'utf16_bom.txt'),
    ('tokenizer.py: input UTF-16', TOKENIZER[:2] + ['{utf16_bom}'] + TOKENIZER[3:], 'utf16_bom.txt'),
    ('judge.py: samples UTF-16', JUDGE[:1] + ['--samples={utf16_cls}'] + JUDGE[2:], 'utf16_cls.jsonl'),
    ('synth.py: prompts UTF-16', ['data/synth.py', '--prompts', '{utf16_chat}', '--out', '{new}', NOWHERE,
                                  '--model=m'], 'utf16_chat.jsonl'),

    # old and hand-edited checkpoints: a model_config without a key that changes the function, a tensor of another
    # shape, a tensor missing, a format version from the future
    *[(f'{command}: {what}', argv + [f'{option}={{{fixture}}}'], names)
      for command, argv, option in (('sample.py', SAMPLE, '--out_dir'), ('eval.py', EVAL, '--checkpoint'),
                                    ('export.py', EXPORT, '--out_dir'), ('export.py gguf', GGUF, '--out_dir'),
                                    ('serve.py', SERVE_ONE, '--out_dir'), ('train.py', TRAIN, '--init_from'),
                                    ('classify.py', CLASSIFY, '--init_from'))
      for what, fixture, names in (('model_config without activation', 'noact_ckpt', 'activation'),
                                   ('model_config without rope_theta', 'norope_ckpt', 'rope_theta'),
                                   ('a tensor of another shape', 'shape_ckpt', 'shape'),
                                   ('a tensor missing', 'notensor_ckpt', 'lack'),
                                   ('a format version from the future', 'future_ckpt', 'format_version'))],
]

MT = 'data/biblia/make_tasks.py'
XM = ['data/biblia/exact_match.py', '--model={sft}', '--questions={questions}']
CASES += [
    ('make_tasks.py: questions, unknown language', [MT, 'questions', '--lang', 'xx', '--out', '{new}'], 'xx'),
    ('make_tasks.py: questions, train_per_answer=0', [MT, 'questions', '--train_per_answer', '0', '--out', '{new}'],
     'train_per_answer'),
    ('make_tasks.py: pref, from_model missing', [MT, 'pref', '--from_model', '{missing}', '--questions', '{questions}',
                                                 '--out', '{new}'], 'missing'),
    ('make_tasks.py: pref, questions of another kind', [MT, 'pref', '--from_model', '{sft}', '--questions',
                                                        '{cls_train}', '--out', '{new}'], 'prompt|chosen'),
    ('make_tasks.py: pref, questions missing', [MT, 'pref', '--from_model', '{sft}', '--questions', '{missing}.jsonl',
                                                '--out', '{new}'], 'missing'),
    ('make_tasks.py: chosen, pairs missing', [MT, 'chosen', '--pairs', '{missing}', '--out', '{new}'], 'missing'),
    ('make_tasks.py: chosen, pairs a file', [MT, 'chosen', '--pairs', '{chat}', '--out', '{new}'], 'chat.jsonl|pairs'),
    ('make_tasks.py: chosen, no out', [MT, 'chosen', '--pairs', '{prefdata}'], 'out'),
    ('exact_match.py: before missing', XM + ['--before={missing}'], 'missing'),
    ('exact_match.py: unknown template', XM + ['--template=llama3'], 'llama3|template'),
    ('exact_match.py: questions not JSONL', XM[:2] + ['--questions={text}'], 'corpus.txt|json'),
    ('exact_match.py: json under a file', XM + ['--json={file}/scores.json'], 'plain.txt'),
]

# -----------------------------------------------------------------------------
# serve.py: its command line, and bad requests to one running server (started with the fixture model,
# the ChatML template and the key KEY). A request case is (name, ['HTTP', raw request], names): clear
# when the reply is a 4xx whose text names the problem; unclear a 4xx that does not; silent a 2xx/3xx;
# traceback a 5xx; hang no reply within the timeout; crash the server no longer answers /health.

KEY = 'sesame'
SERVE = ['serve.py', '--out_dir={out}', '--device=cpu', '--port=0', '--quiet']


def http(method, path, body=None, headers=None, raw_body=None):
    """The raw bytes of one request, with the key and a JSON body unless headers say otherwise."""
    data = raw_body if raw_body is not None else (b'' if body is None else json.dumps(body).encode())
    head = {'Host': '127.0.0.1', 'Authorization': f'Bearer {KEY}', 'Content-Type': 'application/json',
            'Content-Length': str(len(data)), 'Connection': 'close', **(headers or {})}
    lines = [f'{method} {path} HTTP/1.1'] + [f'{k}: {v}' for k, v in head.items() if v is not None]
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + data


def completion(**extra):
    return http('POST', '/v1/completions', {'prompt': 'o gato', 'max_tokens': 4, **extra})


def chat(messages, **extra):
    return http('POST', '/v1/chat/completions', {'messages': messages, 'max_tokens': 4, **extra})


HI = [{'role': 'user', 'content': 'oi'}]
CASES += [
    ('serve.py: port=70000', SERVE[:-2] + ['--port=70000'], '70000|port'),
    ('serve.py: port in use', SERVE[:-2] + ['--port={busy_port}'], 'in use|{busy_port}'),
    ('serve.py: max_batch=0', SERVE + ['--max_batch=0'], 'max_batch'),
    ('serve.py: out_dir missing', ['serve.py', '--out_dir={missing}', '--port=0'], 'missing'),
    ('serve.py: unknown chat template', SERVE + ['--chat_template=llama3'], 'llama3|template'),
    ('serve.py: host not an address', SERVE + ['--host=not a host'], 'not a host|host'),
    ('serve.py: HTTP seed 2**64', ['HTTP', completion(seed=2 ** 64, temperature=1)], 'seed'),
    ('serve.py: HTTP seed -1', ['HTTP', completion(seed=-1)], 'seed'),
    ('serve.py: HTTP seed 1.5', ['HTTP', completion(seed=1.5)], 'seed'),
    ('serve.py: HTTP temperature NaN', ['HTTP', http('POST', '/v1/completions',
                                                     raw_body=b'{"prompt": "a", "temperature": NaN}')], 'temperature'),
    ('serve.py: HTTP top_p Infinity', ['HTTP', http('POST', '/v1/completions',
                                                    raw_body=b'{"prompt": "a", "top_p": Infinity}')], 'top_p'),
    ('serve.py: HTTP temperature a string', ['HTTP', completion(temperature='hot')], 'temperature'),
    ('serve.py: HTTP top_k a float', ['HTTP', completion(top_k=1e3)], 'top_k'),
    ('serve.py: HTTP repetition_penalty 1e-300', ['HTTP', completion(repetition_penalty=1e-300)], 'repetition_penalty'),
    ('serve.py: HTTP max_tokens huge', ['HTTP', completion(max_tokens=10 ** 6)], 'context|max_tokens'),
    ('serve.py: HTTP max_tokens true', ['HTTP', completion(max_tokens=True)], 'max_tokens'),
    ('serve.py: HTTP n=0', ['HTTP', completion(n=0)], "'n'"),
    ('serve.py: HTTP 2000 prompts x 128', ['HTTP', completion(prompt=['a'] * 2000, n=128)], 'rows|limit'),
    ('serve.py: HTTP 100000 stop strings', ['HTTP', completion(stop=[f's{i}' for i in range(100000)])], 'stop'),
    ('serve.py: HTTP a stop string of 10000', ['HTTP', completion(stop=['x' * 10000])], 'stop'),
    ('serve.py: HTTP stop_token_ids -1', ['HTTP', completion(stop_token_ids=[-1])], 'stop_token_ids'),
    ('serve.py: HTTP prompt ids beyond vocab', ['HTTP', completion(prompt=[1, 10 ** 9])], 'vocab'),
    ('serve.py: HTTP prompt of bools', ['HTTP', completion(prompt=[True, False])], 'prompt'),
    ('serve.py: HTTP prompt empty ids', ['HTTP', completion(prompt=[[]])], 'prompt'),
    ('serve.py: HTTP prompt lone surrogate', ['HTTP', completion(prompt='a\ud800b')], 'surrogate'),
    ('serve.py: HTTP prompt list, lone surrogate', ['HTTP', completion(prompt=['ok', '\udfff'])], 'surrogate'),
    ('serve.py: HTTP chat content lone surrogate', ['HTTP', chat([{'role': 'user', 'content': '\udc80'}])],
     'surrogate'),
    ('serve.py: HTTP chat text part not a string', ['HTTP', chat([{'role': 'user', 'content': [
        {'type': 'text', 'text': 5}]}])], 'text'),
    ('serve.py: HTTP chat image part', ['HTTP', chat([{'role': 'user', 'content': [
        {'type': 'image_url', 'image_url': {'url': 'x'}}]}])], 'text'),
    ('serve.py: HTTP chat content a number', ['HTTP', chat([{'role': 'user', 'content': 42}])], 'content'),
    ('serve.py: HTTP chat role missing', ['HTTP', chat([{'content': 'oi'}])], 'role'),
    ('serve.py: HTTP chat role robot', ['HTTP', chat([{'role': 'robot', 'content': 'oi'}])], 'robot|role'),
    ('serve.py: HTTP chat 2000 messages', ['HTTP', chat(HI * 2000)], 'messages'),
    ('serve.py: HTTP chat messages an object', ['HTTP', chat({'role': 'user'})], 'messages'),
    ('serve.py: HTTP stream_options not an object', ['HTTP', completion(stream=True, stream_options='yes')],
     'stream_options'),
    ('serve.py: HTTP logprobs 99', ['HTTP', completion(logprobs=99)], 'logprobs'),
    ('serve.py: HTTP chat logprobs', ['HTTP', chat(HI, logprobs=True)], 'logprobs'),
    ('serve.py: HTTP tools', ['HTTP', chat(HI, tools=[{'type': 'function', 'function': {'name': 'f'}}])], 'tools'),
    ('serve.py: HTTP response_format json', ['HTTP', chat(HI, response_format={'type': 'json_object'})],
     'response_format'),
    ('serve.py: HTTP unknown model', ['HTTP', completion(model='gpt-4')], 'gpt-4'),
    ('serve.py: HTTP body not JSON', ['HTTP', http('POST', '/v1/completions', raw_body=b'{prompt: a}')], 'json'),
    ('serve.py: HTTP body a JSON list', ['HTTP', http('POST', '/v1/completions', ['a'])], 'object'),
    ('serve.py: HTTP body not UTF-8', ['HTTP', http('POST', '/v1/completions',
                                                    raw_body=b'{"prompt": "\xff\xfe"}')], 'json|utf'),
    ('serve.py: HTTP body nested 100000 deep', ['HTTP', http('POST', '/v1/completions',
                                                             raw_body=b'[' * 100000 + b']' * 100000)], 'json'),
    ('serve.py: HTTP Content-Length -1', ['HTTP', http('POST', '/v1/completions', {'prompt': 'a'},
                                                       {'Content-Length': '-1'})], 'invalid'),
    ('serve.py: HTTP Content-Length abc', ['HTTP', http('POST', '/v1/completions', {'prompt': 'a'},
                                                        {'Content-Length': 'abc'})], 'invalid'),
    ('serve.py: HTTP Content-Length over the limit', ['HTTP', http('POST', '/v1/completions', raw_body=b'',
                                                                   headers={'Content-Length': str(50 << 20)})],
     'limit'),
    ('serve.py: HTTP body shorter than Content-Length', ['HTTP', http('POST', '/v1/completions', raw_body=b'{"pr',
                                                                      headers={'Content-Length': '400'})],
     'did not arrive'),
    ('serve.py: HTTP bad chunk size', ['HTTP', http('POST', '/v1/completions', raw_body=b'zz\r\n{}\r\n0\r\n\r\n',
                                                    headers={'Content-Length': None,
                                                             'Transfer-Encoding': 'chunked'})], 'invalid'),
    ('serve.py: HTTP text/plain body', ['HTTP', http('POST', '/v1/completions', {'prompt': 'a'},
                                                     {'Content-Type': 'text/plain'})], 'application/json'),
    ('serve.py: HTTP another site', ['HTTP', http('POST', '/v1/completions', {'prompt': 'a'},
                                                  {'Origin': 'http://attacker.example'})], 'another site'),
    ('serve.py: HTTP DNS rebinding', ['HTTP', http('GET', '/v1/models', headers={'Host': 'attacker.example'})],
     'rebinding'),
    ('serve.py: HTTP no key', ['HTTP', http('GET', '/stats', headers={'Authorization': None})], 'api key'),
    ('serve.py: HTTP wrong key, lowercase scheme', ['HTTP', http('GET', '/v1/models',
                                                               headers={'Authorization': 'bearer nope'})], 'api key'),
    ('serve.py: HTTP unknown route', ['HTTP', http('POST', '/v1/embeddings', {'input': 'a'})], 'no route'),
    ('serve.py: HTTP DELETE a route', ['HTTP', http('DELETE', '/v1/models')], 'not allowed'),
]

# -----------------------------------------------------------------------------
# fixtures


def run_ok(root, *argv):
    """Run a project command that must succeed (building a fixture)."""
    p = subprocess.run([sys.executable, os.path.join(REPO, argv[0]), *argv[1:]], cwd=root, env=ENV,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"fixture failed: {' '.join(argv)}\n{p.stdout[-2000:]}{p.stderr[-2000:]}")


def write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(content if isinstance(content, bytes) else content.encode('utf-8'))
    return path


def jsonl(path, records):
    return write(path, ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records))


def build_fixtures(root):
    """Every file the cases point at -> {name: path}."""
    sys.path.insert(0, REPO)
    import numpy as np
    import torch
    from mirim.shards import HEADER_BYTES, make_header

    rng = random.Random(0)
    words = [['o gato', 'a menina', 'o rei', 'um homem', 'o povo'], ['come', 've', 'ama', 'fala com'],
             ['o peixe', 'a terra', 'a luz', 'as aguas']]
    sentence = lambda: ' '.join(rng.choice(w) for w in words) + '.'
    docs = [' '.join(sentence() for _ in range(rng.randint(2, 6))) for _ in range(200)]
    j = lambda name: os.path.join(root, name)
    fx = dict(
        text=write(j('corpus.txt'), '\n\n'.join(docs) + '\n'),
        empty=write(j('empty.txt'), ''),
        empty_jsonl=write(j('empty.jsonl'), ''),
        binary=write(j('noise.txt'), bytes(rng.randrange(256) for _ in range(4000)) + b'\xff\xfe\x80'),
        latin1=write(j('latin1.txt'), '\n\n'.join(d + ' A nação, só ação.' for d in docs).encode('latin-1')),
        file=write(j('plain.txt'), 'a regular file\n'),
        notjson=write(j('notjson.jsonl'), '{"text": "unterminated\nhello world\n'),
        prompts=write(j('prompts.txt'), 'o gato\na menina come\n'),
        bad_tiktoken=write(j('bad.tiktoken'), 'this is not a ranks file\n\x00\x01\n'),
        cfg_syntax=write(j('cfg/syntax.py'), 'batch_size = (4\n'),
        cfg_nameerror=write(j('cfg/nameerror.py'), 'batch_size = undefined_name * 2\n'),
        cfg_latin1=write(j('cfg/latin1.py'), "out_dir = 'sa\xedda'\n".encode('latin-1')),
        cfg_unknown=write(j('cfg/unknown.py'), 'lerning_rate = 1e-3\n'),
        cfg_badtype=write(j('cfg/badtype.py'), "batch_size = 'sixteen'\n"),
        cfg_import=write(j('cfg/imports.py'), "from math import pi\nlearning_rate = pi / 1000\n"),
        lang_nowords=write(j('lang_nowords/prompt.txt'), 'Escreva sobre {noun}.\n'),
        badlog=write(j('badlog/log.jsonl'), 'not json\n{"foo": 1}\n[1, 2]\n'),
        png=write(j('old.png'), b'\x89PNG\r\n\x1a\nan earlier plot'),
    )
    for name, files in dict(lang_badwords={'prompt.txt': 'Escreva sobre {noun}.', 'words.json': '{"noun": ['},
                            lang_noslot={'prompt.txt': 'Escreva sobre {noun} {colour}.', 'words.json': '{"noun": ["gato"]}'},
                            lang_badregex={'prompt.txt': 'Escreva sobre {noun}.', 'words.json': '{"noun": ["gato"]}',
                                           'cleanup.json': '[["(unclosed", ""]]'}).items():
        for file, text in files.items():
            write(j(f'{name}/{file}'), text)
        fx[name] = j(name)
    story = {'text': 'Era uma vez um gato.', 'words': {'noun': 'gato'}, 'model': 'm'}
    fx['stories_badmid'] = write(j('stories_badmid.jsonl'), json.dumps(story) + '\n{"text": "Era uma\n'
                                 + json.dumps(dict(story, words={'noun': 'rei'})) + '\n')
    fx['generic_out'] = jsonl(j('generic_out.jsonl'), [{'id': 0, 'prompt': 'Oi', 'completion': 'Ola.', 'messages': [
        {'role': 'user', 'content': 'Oi'}, {'role': 'assistant', 'content': 'Ola.'}]}])
    os.makedirs(j('emptydir'))
    fx['emptydir'] = j('emptydir')
    fx['lang_nowords'] = os.path.dirname(fx['lang_nowords'])
    say = [{'role': 'user', 'content': 'Diga algo.'}, {'role': 'assistant', 'content': 'o gato come o peixe.'}]
    fx['chat'] = jsonl(j('chat.jsonl'), [{'messages': say}] * 10 + [{'prompt': 'Oi', 'completion': 'Ola.'}] * 10)
    fx['chat_nofield'] = jsonl(j('chat_nofield.jsonl'), [{'foo': 1}] * 3)
    fx['chat_badrole'] = jsonl(j('chat_badrole.jsonl'), [{'messages': [{'role': 'robot', 'content': 'beep'}]}] * 3)
    fx['chat_nomessages'] = jsonl(j('chat_nomessages.jsonl'), [{'messages': []}] * 3)
    labelled = [{'text': d, 'label': 'gato' if 'gato' in d else 'outro'} for d in docs]
    fx['cls_train'] = jsonl(j('cls_train.jsonl'), labelled[:40])
    fx['cls_test'] = jsonl(j('cls_test.jsonl'), labelled[40:60])
    fx['cls_set'] = j('cls_set')  # a classification set, as make_tasks.py classify writes one
    jsonl(j('cls_set/train.jsonl'), labelled[:10])
    jsonl(j('cls_set/test.jsonl'), labelled[10:20])
    fx['cls_nolabel'] = jsonl(j('cls_nolabel.jsonl'), [{'text': d} for d in docs[:10]])
    fx['cls_onelabel'] = jsonl(j('cls_onelabel.jsonl'), [{'text': d, 'label': 'a'} for d in docs[:10]])
    fx['cls_unseen'] = jsonl(j('cls_unseen.jsonl'), [{'text': d, 'label': 'zebra'} for d in docs[:10]])
    mc = {'context': 'o gato', 'choices': [' come o peixe.', ' ama a luz.'], 'gold': 0}
    fx['mc'] = jsonl(j('mc.jsonl'), [mc] * 4)
    fx['mc_nogold'] = jsonl(j('mc_nogold.jsonl'), [{k: v for k, v in mc.items() if k != 'gold'}] * 4)
    fx['mc_gold_oob'] = jsonl(j('mc_gold_oob.jsonl'), [dict(mc, gold=5)] * 4)
    fx['mc_nochoices'] = jsonl(j('mc_nochoices.jsonl'), [dict(mc, choices=[], gold=0)] * 4)
    fx['mc_choices_str'] = jsonl(j('mc_choices_str.jsonl'), [dict(mc, choices='abc')] * 4)

    # the project's own commands make the real fixtures
    fx['data'], fx['sp_model'], fx['spdata'] = j('data'), j('sp/tokenizer.model'), j('spdata')
    run_ok(root, 'data/prepare.py', '--input', fx['text'], '--tokenizer', 'bytes', '--out', fx['data'],
           '--val_fraction', '0.1')
    run_ok(root, 'tokenizer.py', '--input', fx['text'], '--vocab_size', '300', '--num_threads', '1',
           '--out', fx['sp_model'])
    run_ok(root, 'data/prepare.py', '--input', fx['text'], '--tokenizer', fx['sp_model'], '--out', fx['spdata'],
           '--val_fraction', '0.1')
    fx['out'] = j('out')
    run_ok(root, *[a.format(data=fx['data'], new=fx['out']) for a in TRAIN])
    fx['ckpt'] = os.path.join(fx['out'], 'ckpt.pt')
    fx['hf'] = j('hf')
    run_ok(root, 'export.py', f"--out_dir={fx['out']}", f"--dest={fx['hf']}")

    # broken copies
    for name in ('out_scratch', 'out_resume'):
        fx[name] = shutil.copytree(fx['out'], j(name))
    os.makedirs(j('out_nobest'))
    fx['out_nobest'] = j('out_nobest')
    shutil.copy(fx['ckpt'], fx['out_nobest'])
    fx['hf_badconfig'] = shutil.copytree(fx['hf'], j('hf_badconfig'))
    write(os.path.join(fx['hf_badconfig'], 'config.json'), '{"model_type": "llama", ')
    fx['hf_noweights'] = shutil.copytree(fx['hf'], j('hf_noweights'))
    os.remove(os.path.join(fx['hf_noweights'], 'model.safetensors'))
    fx['hf_cut'] = shutil.copytree(fx['hf'], j('hf_cut'))
    with open(os.path.join(fx['hf_cut'], 'model.safetensors'), 'r+b') as f:
        f.truncate(os.path.getsize(f.name) // 2)
    fx['hf_layers_str'] = shutil.copytree(fx['hf'], j('hf_layers_str'))
    with open(os.path.join(fx['hf_layers_str'], 'config.json'), encoding='utf-8') as f:
        hf_config = json.load(f)
    write(os.path.join(fx['hf_layers_str'], 'config.json'), json.dumps({**hf_config, 'num_hidden_layers': '2'}))
    fx['gz_cut'] = j('corpus.txt.gz')
    with gzip.open(fx['gz_cut'], 'wb') as f:
        f.write(open(fx['text'], 'rb').read() * 20)
    with open(fx['gz_cut'], 'r+b') as f:
        f.truncate(os.path.getsize(fx['gz_cut']) // 2)
    ckpt = torch.load(fx['ckpt'], map_location='cpu', weights_only=True)
    for tensor in ckpt['model'].values():
        if tensor.is_floating_point():
            tensor.fill_(float('nan'))
    fx['nan_ckpt'] = j('nan/ckpt.pt')
    os.makedirs(j('nan'))
    torch.save(ckpt, fx['nan_ckpt'])
    fx['notckpt'] = j('notckpt.pt')
    torch.save({'weights': torch.zeros(3), 'note': 'not a checkpoint'}, fx['notckpt'])
    ckpt = torch.load(fx['ckpt'], map_location='cpu', weights_only=True)
    del ckpt['model_config']['tie_embeddings']  # an older or hand-edited checkpoint: it must not load tied
    fx['notie_ckpt'] = j('notie.pt')
    torch.save(ckpt, fx['notie_ckpt'])
    ckpt = torch.load(fx['ckpt'], map_location='cpu', weights_only=True)
    fx['cls_other'] = j('cls_other.pt')  # a classifier whose labels are not the classify fixtures'
    torch.save({**ckpt, 'head': {'weight': torch.zeros(3, ckpt['model_config']['n_embd'])}, 'labels': ['x', 'y', 'z'],
                'classify': {'max_length': 32}}, fx['cls_other'])
    pairs = [{'prompt': f'Diga algo {i}.', 'chosen': 'o gato come o peixe.', 'rejected': 'a luz ve o rei.'}
             for i in range(20)]
    fx['prefdata'], fx['chat_nomasks'] = j('prefdata'), j('chat_nomasks')
    fx['pairs'] = jsonl(j('pairs.jsonl'), pairs)
    cls_lines = [json.dumps(r) + '\n' for r in labelled[:40]]
    chat_lines = open(fx['chat'], encoding='utf-8').read()
    mc_lines = open(fx['mc'], encoding='utf-8').read()
    fx.update(utf16_bom=write(j('utf16_bom.txt'), (open(fx['text'], encoding='utf-8').read()).encode('utf-16')),
              utf16_be=write(j('utf16_be.txt'), open(fx['text'], encoding='utf-8').read().encode('utf-16-be')),
              utf16_cls=write(j('utf16_cls.jsonl'), ''.join(cls_lines).encode('utf-16')),
              utf16le_cls=write(j('utf16le_cls.jsonl'), ''.join(cls_lines).encode('utf-16-le')),
              utf16_chat=write(j('utf16_chat.jsonl'), chat_lines.encode('utf-16')),
              utf16le_chat=write(j('utf16le_chat.jsonl'), chat_lines.encode('utf-16-le')),
              utf16_pairs=write(j('utf16_pairs.jsonl'), ''.join(json.dumps(p) + '\n' for p in pairs).encode('utf-16')),
              utf16_mc=write(j('utf16_mc.jsonl'), mc_lines.encode('utf-16')),
              nul_late=write(j('nul_late.txt'), open(fx['text'], 'rb').read() * 2 + b'o gato\x00 come\n'),
              nul_late_jsonl=write(j('nul_late.jsonl'), ''.join(cls_lines * 10).encode() + b'{"text": "a"}\x00\n'))
    import pyarrow as pa
    import pyarrow.parquet as pq
    for name, table in (('parquet_bad', pa.table({'text': docs * 25})),
                        ('parquet_chat_bad', pa.table({'prompt': [d[:40] for d in docs] * 25,
                                                       'completion': docs * 25}))):
        path = j(f"{name.replace('parquet_', '')}.parquet")
        pq.write_table(table, path, row_group_size=500, compression='none')
        data = bytearray(open(path, 'rb').read())
        data[len(data) // 2:len(data) // 2 + 3000] = b'\x55' * 3000
        fx[name] = write(path, bytes(data))
    fx['jsonl_gz_cut'] = j('cut.jsonl.gz')
    with gzip.open(fx['jsonl_gz_cut'], 'wb') as f:
        f.write(''.join(cls_lines * 30).encode())
    with open(fx['jsonl_gz_cut'], 'r+b') as f:
        f.truncate(os.path.getsize(f.name) // 2)
    run_ok(root, 'data/prepare_pref.py', '--input', fx['pairs'], '--tokenizer', 'bytes',
           '--val_fraction', '0.2', '--out', fx['prefdata'])
    fx['pairs_num'] = jsonl(j('pairs_num.jsonl'), [dict(p, chosen=7) for p in pairs])
    fx['pairs_same'] = jsonl(j('pairs_same.jsonl'), [dict(p, rejected=p['chosen']) for p in pairs])
    fx['prefdata2'] = j('prefdata2')  # other pairs, same tokenizer and template
    run_ok(root, 'data/prepare_pref.py', '--input', jsonl(j('pairs2.jsonl'), [dict(p, prompt=p['prompt'] + '!')
                                                                           for p in pairs]),
           '--tokenizer', 'bytes', '--val_fraction', '0.2', '--out', fx['prefdata2'])
    # dpo.py's: an SFT model on chat data (bytes, ChatML), a DPO run from it, the SFT model without its template
    # (a base model of the same tokenizer), and broken copies
    fx['questions'] = jsonl(j('questions.jsonl'), [{'prompt': 'Em que testamento está o livro de Rute?',
                                                    'chosen': 'Do Antigo Testamento.', 'task': 'testament'}] * 4)
    fx['chatdata'], fx['sft'], fx['dpo_run'] = j('chatdata'), j('sft'), j('dpo_run')
    run_ok(root, 'data/prepare_chat.py', '--input', fx['chat'], '--tokenizer', 'bytes', '--val_fraction', '0.2',
           '--out', fx['chatdata'])
    run_ok(root, *[a.format(data=fx['chatdata'], new=fx['sft']) for a in TRAIN + ['--block_size=64']])
    run_ok(root, *[a.format(sft=fx['sft'], prefdata=fx['prefdata'], new=fx['dpo_run']) for a in DPO])
    sft = torch.load(os.path.join(fx['sft'], 'ckpt.pt'), map_location='cpu', weights_only=True)
    del sft['tokenizer']['chat_template']
    fx['base'] = j('base.pt')
    torch.save(sft, fx['base'])
    for name in ('dpo_cutref', 'dpo_noref', 'dpo_otherdata', 'dpo_copy'):
        fx[name] = shutil.copytree(fx['dpo_run'], j(name))
    fx['sft_copy'] = shutil.copytree(fx['sft'], j('sft_copy'))
    with open(os.path.join(fx['dpo_cutref'], 'reference.pt'), 'r+b') as f:
        f.truncate(os.path.getsize(f.name) // 2)
    os.remove(os.path.join(fx['dpo_noref'], 'reference.pt'))
    # hand-edited checkpoints
    ckpt = torch.load(fx['ckpt'], map_location='cpu', weights_only=True)
    edits = dict(noact_ckpt=lambda c: c['model_config'].pop('activation'),
                 norope_ckpt=lambda c: c['model_config'].pop('rope_theta'),
                 shape_ckpt=lambda c: c['model'].__setitem__('norm.weight', torch.ones(7)),
                 notensor_ckpt=lambda c: c['model'].pop('layers.1.attention.wo.weight', None) if
                 'layers.1.attention.wo.weight' in c['model'] else c['model'].pop(sorted(c['model'])[-1]),
                 future_ckpt=lambda c: c.__setitem__('format_version', 99))
    for name, edit in edits.items():
        edited = {**ckpt, 'model_config': dict(ckpt['model_config']), 'model': dict(ckpt['model'])}
        edit(edited)
        fx[name] = j(f'{name}.pt')
        torch.save(edited, fx[name])
    fx['gguf'] = j('gguf')
    run_ok(root, 'export.py', '--format=gguf', f"--out_dir={fx['out']}", f"--dest={fx['gguf']}")
    run_ok(root, 'data/prepare_chat.py', '--input', fx['chat'], '--tokenizer', 'bytes', '--val_fraction', '0.2',
           '--out', fx['chat_nomasks'])
    for name in os.listdir(fx['chat_nomasks']):
        if name.endswith('.mask.bin'):
            os.remove(os.path.join(fx['chat_nomasks'], name))

    with open(os.path.join(fx['data'], 'meta.json'), encoding='utf-8') as f:
        meta = json.load(f)
    vocab = meta['vocab_size']
    shard = lambda d, split: os.path.join(d, f'{split}_000000.bin')
    for name in ('data_badmeta', 'data_noshards', 'data_truncated', 'data_badmagic', 'data_badids'):
        fx[name] = shutil.copytree(fx['data'], j(name))
    for name in ('data_shard_dir', 'data_meta_list', 'data_vocab_str'):
        fx[name] = shutil.copytree(fx['data'], j(name))
    os.remove(shard(fx['data_shard_dir'], 'train'))
    os.mkdir(shard(fx['data_shard_dir'], 'train'))
    write(os.path.join(fx['data_meta_list'], 'meta.json'), json.dumps([meta]))
    write(os.path.join(fx['data_vocab_str'], 'meta.json'), json.dumps({**meta, 'vocab_size': str(vocab)}))
    write(os.path.join(fx['data_badmeta'], 'meta.json'), '{"vocab_size": 260, "splits": ')
    for split in ('train', 'val'):
        os.remove(shard(fx['data_noshards'], split))
        with open(shard(fx['data_truncated'], split), 'r+b') as f:
            f.truncate(HEADER_BYTES + 101)
        with open(shard(fx['data_badmagic'], split), 'r+b') as f:
            f.write(np.int32(12345).tobytes())
        n = meta['splits'][split]['tokens']
        ids = np.random.default_rng(0).integers(vocab, vocab + 500, size=n).astype(np.uint16)
        write(shard(fx['data_badids'], split), make_header(2, n, vocab) + ids.tobytes())
    return fx


# -----------------------------------------------------------------------------
# running the cases

def last_line(output):
    lines = [line.split('\r')[-1].strip() for line in output.splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else ''


def run_case(case, fx, root, timeout):
    """-> (outcome, the command as typed, the last line of its output, seconds)."""
    name, argv, names = case
    if argv[0] == 'HTTP':
        return run_request(name, argv[1], names, fx, timeout)
    if argv[0] == 'FAULT':
        return run_fault(name, argv[1], names, fx, root, timeout)
    case_dir = os.path.join(root, 'cases', ''.join(c if c.isalnum() else '_' for c in name))
    os.makedirs(case_dir, exist_ok=True)
    paths = dict(fx, repo=REPO, case=case_dir, new=os.path.join(case_dir, 'new'),
                 missing=os.path.join(case_dir, 'missing'))
    argv = [a.format(**paths) for a in argv]
    names = names.format(**paths)
    shown = ' '.join(a if a and ' ' not in a else repr(a) for a in argv).replace(root, '$T').replace(REPO, '.')
    t0 = time.time()
    p = subprocess.Popen([sys.executable, os.path.join(REPO, argv[0]), *argv[1:]], cwd=case_dir, env=ENV,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)  # a process group: a timeout ends its children too
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return 'hang', shown, last_line(out.decode('utf-8', 'replace')).replace(root, '$T'), time.time() - t0
    out = out.decode('utf-8', 'replace')
    tail = last_line(out).replace(root, '$T')
    if 'Traceback (most recent call last)' in out:
        outcome = 'traceback'
    elif p.returncode < 0:
        outcome, tail = 'crash', f"killed by signal {-p.returncode}; {tail}"
    else:
        warning_will_do = names.startswith('warn:')  # exit 0 is fine if a warning line names the problem
        names = names.removeprefix('warn:').lower().split('|')
        lines = [line.lower() for line in out.splitlines() if line.strip()]
        if p.returncode == 0:
            warned = [line for line in lines if ('warning' in line or line.startswith('note:'))
                      and any(n in line for n in names)]
            outcome = 'clear' if warning_will_do and warned else 'silent'
        else:
            outcome = 'clear' if any(n in ' '.join(lines[-3:]) for n in names) else 'unclear'
    return outcome, shown, tail, time.time() - t0


def run_request(name, data, names, fx, timeout):
    """One raw request to the running serve.py -> (outcome, the request line, the reply's first lines, seconds)."""
    port = fx['serve_port']
    t0 = time.time()
    s = socket.create_connection(('127.0.0.1', port))
    s.settimeout(timeout)
    reply = b''
    try:
        s.sendall(data)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    except socket.timeout:
        return 'hang', data.split(b'\r\n')[0].decode('latin-1'), '(no reply)', time.time() - t0
    except OSError as e:  # the server closed while the request was still being sent: its reply may be in
        reply += recv_rest(s)
        if not reply:
            return 'unclear', data.split(b'\r\n')[0].decode('latin-1'), f'connection closed: {e}', time.time() - t0
    finally:
        s.close()
    text = reply.decode('utf-8', 'replace')
    head, _, body = text.partition('\r\n\r\n')
    status = int(head.split(' ', 2)[1]) if head.startswith('HTTP/1.1 ') else 0
    alive = health(port)
    shown = data.split(b'\r\n')[0].decode('latin-1') + f' ({len(data)} bytes)'
    tail = f'{status} {body[:300]}'
    if not alive:
        return 'crash', shown, '/health does not answer 200 after it: ' + tail, time.time() - t0
    if status >= 500 or status == 0:
        return 'traceback', shown, tail, time.time() - t0
    if status < 400:
        return 'silent', shown, tail, time.time() - t0
    found = any(n in body.lower() for n in names.lower().split('|'))
    return ('clear' if found else 'unclear'), shown, tail, time.time() - t0


# the fault cases: a shim (sitecustomize.py on PYTHONPATH, in the fault cases only) sends the signal when the
# command renames a file into place (every write of the project goes through a temp file and os.replace)
SHIM = """import os, re, signal
_spec = os.environ.pop('MIRIM_FAULT', '')
if _spec:
    _signal, _pattern = _spec.split(':', 1)
    _replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if re.search(_pattern, os.fspath(dst)):
            os.replace = _replace  # once
            print(f"fault: SIG{_signal} before {dst} is renamed into place", flush=True)
            os.kill(os.getpid(), signal.SIGKILL if _signal == 'KILL' else signal.SIGTERM)
        return _replace(src, dst, *args, **kwargs)
    os.replace = replace
"""
TEMP_NAME = re.compile(r'\.tmp\d*$')


def mount_tmpfs(path, size):
    """A tmpfs of `size` bytes at path -> True, or False where none can be mounted (not root)."""
    os.makedirs(path, exist_ok=True)
    if shutil.which('mount') is None:
        return False
    p = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path], capture_output=True)
    return p.returncode == 0


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def check_result(path, kind, temps_ok=False):
    """'' when every result in path loads (none at all is fine: a new folder) and no temp file is left (unless
    temps_ok: right after a kill -9 they are there, for the next run to remove), else what is wrong."""
    import torch
    from mirim.checkpoint import load_checkpoint
    from mirim.shards import BatchSampler, load_meta
    if not os.path.isdir(path):
        return ''
    names = sorted(os.listdir(path))
    left = [n for n in names if TEMP_NAME.search(n)]
    if left and not temps_ok:
        return f"temp files left in {path}: {left}"
    try:
        if kind == 'ckpt':
            for name in names:
                if name.endswith('.pt'):
                    load_checkpoint(os.path.join(path, name), keys=('data',) if name == 'reference.pt' else
                                    ('model', 'model_config', 'tokenizer'))
        elif kind == 'data' and 'meta.json' in names:
            meta = load_meta(path)
            for split in meta['splits']:
                BatchSampler(path, split, batch_size=1, block_size=4)
        elif kind == 'hf' and 'config.json' in names:
            from mirim.checkpoint import load_model
            load_model(path)
        elif kind == 'gguf':
            from gguf import GGUFReader
            for name in names:
                if name.endswith('.gguf'):
                    GGUFReader(os.path.join(path, name))
        elif kind == 'tokenizer' and 'tokenizer.model' in names:
            from mirim.tokenizer import load_tokenizer
            load_tokenizer(os.path.join(path, 'tokenizer.model'))
    except Exception as e:  # noqa: BLE001 - whatever does not load is the finding
        return f"{path} no longer loads: {type(e).__name__}: {str(e)[:200]}"
    del torch
    return ''


def run_fault(name, spec, names, fx, root, timeout):
    """A fault case -> (outcome, the command, what happened, seconds): the command with the fault, then the
    checks of its folder, then the same command again (with --overwrite when the line asks for it)."""
    case_dir = os.path.join(root, 'cases', ''.join(c if c.isalnum() else '_' for c in name))
    os.makedirs(case_dir, exist_ok=True)
    run_dir, disk = os.path.join(case_dir, 'run'), None
    t0 = time.time()
    env = dict(ENV)
    limit = None
    if spec['kind'] == 'FULL':
        room = spec['at'] + (folder_bytes(fx[spec['previous']]) if spec['previous'] else 0)
        disk = os.path.join(case_dir, 'disk')
        if mount_tmpfs(disk, max(room, 4096)):  # size=0 would be no limit at all
            run_dir = os.path.join(disk, 'run')
        else:
            disk, limit = None, spec['at']  # no tmpfs: no file may grow past `at` bytes (EFBIG)
    else:
        shim = os.path.join(root, 'shim')
        os.makedirs(shim, exist_ok=True)
        write(os.path.join(shim, 'sitecustomize.py'), SHIM)
        env.update(PYTHONPATH=shim, MIRIM_FAULT=f"{spec['kind']}:{spec['at']}")
    try:
        if spec['previous']:
            shutil.copytree(fx[spec['previous']], run_dir)
        paths = dict(fx, repo=REPO, case=case_dir, run=run_dir, new=os.path.join(case_dir, 'new'))
        argv = [a.format(**paths) for a in spec['argv']]
        shown = ' '.join(argv).replace(root, '$T').replace(REPO, '.')
        shown = f"[{spec['kind']} at {spec['at']}] {shown}"

        def limits():
            if limit is not None:
                import resource
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        outcome, out, code = command(argv, case_dir, env, timeout, limits)
        tail = last_line(out).replace(root, '$T')
        if outcome != 'ran':
            return outcome, shown, tail, time.time() - t0
        if spec['kind'] == 'KILL' and code != -signal.SIGKILL:
            return 'unclear', shown, f"the fault never fired (exit {code}): {tail}", time.time() - t0
        if spec['kind'] == 'FULL':
            lines = ' '.join(line.lower() for line in out.splitlines()[-3:])
            if code == 0:
                return 'silent', shown, tail, time.time() - t0
            if not any(n in lines for n in names.split('|')):
                return 'unclear', shown, tail, time.time() - t0
        problem = check_result(run_dir, spec['result'], temps_ok=True) if spec['previous'] else ''
        if problem:  # the previous result no longer loads (a new folder may hold part of a result: the next run's)
            return 'lost', shown, problem.replace(root, '$T'), time.time() - t0
        if disk:  # space freed: the folder as it was left, on the ordinary disk
            if os.path.isdir(run_dir):
                shutil.copytree(run_dir, os.path.join(case_dir, 'run'))
            subprocess.run(['umount', disk], capture_output=True)
            disk, run_dir = None, os.path.join(case_dir, 'run')
            argv = [a.format(**dict(paths, run=run_dir)) for a in spec['argv']]
        again, out2, code2 = command(argv, case_dir, ENV, timeout)
        for told in ('--overwrite', '--init_from=resume'):  # the next run as its line says
            if again == 'ran' and code2 != 0 and told in last_line(out2) and told not in argv:
                argv = argv + [told]
                again, out2, code2 = command(argv, case_dir, ENV, timeout)
        if again != 'ran' or code2 != 0:
            return 'lost', shown, f"the next run failed: {last_line(out2)}".replace(root, '$T'), time.time() - t0
        problem = check_result(run_dir, spec['result'])
        if problem:
            return 'lost', shown, problem.replace(root, '$T'), time.time() - t0
        return 'clear', shown, f"{tail} | then: {last_line(out2)}".replace(root, '$T'), time.time() - t0
    finally:
        if disk:
            subprocess.run(['umount', disk], capture_output=True)


def command(argv, cwd, env, timeout, preexec=None):
    """Run one project command -> ('ran' | 'hang' | 'traceback', its output, its exit status)."""
    p = subprocess.Popen([sys.executable, os.path.join(REPO, argv[0]), *argv[1:]], cwd=cwd, env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True, preexec_fn=preexec)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return 'hang', out.decode('utf-8', 'replace'), None
    out = out.decode('utf-8', 'replace')
    return ('traceback' if 'Traceback (most recent call last)' in out else 'ran'), out, p.returncode


def recv_rest(s):
    try:
        s.settimeout(2)
        return s.recv(65536)
    except OSError:
        return b''


def health(port):
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
            s.settimeout(10)
            s.sendall(b'GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n')
            return s.recv(100).startswith(b'HTTP/1.1 200')
    except OSError:
        return False


def start_server(fx, root):
    """serve.py on the fixture model, on a free port -> (the process, its port); the busy_port fixture is its port."""
    argv = [a.format(**fx) for a in SERVE] + ['--chat_template=chatml', f'--api_key={KEY}']
    p = subprocess.Popen([sys.executable, os.path.join(REPO, argv[0]), *argv[1:]], cwd=root, env=ENV,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()  # "serving NAME (...) on http://127.0.0.1:PORT ..."
    if 'http://127.0.0.1:' not in line:
        p.kill()
        sys.exit(f"serve.py did not start: {line}{p.stderr.read()[-2000:]}")
    port = int(line.split('http://127.0.0.1:')[1].split()[0].strip(')'))
    threading.Thread(target=p.stderr.read, daemon=True).start()  # drain its log
    return p, port


DEFAULTS = dict(
    list=False,               # print the cases and exit
    only=[],                  # run the cases whose name contains one of these: --only sample.py 'train.py: beta'
    jobs=2,                   # cases run at once
    timeout=60.0,             # seconds one case may run
    keep=False,               # keep the temporary folder (its path is printed)
    all=False,                # print every case, the clear ones too
)


def main():
    args = settings(DEFAULTS, sys.argv[1:], help_source=__file__)
    names = [name for name, _, _ in CASES]
    assert len(names) == len(set(names)), "two cases have the same name"
    cases = [c for c in CASES if not args.only or any(s in c[0] for s in args.only)]
    if args.list:
        for name, argv, _ in cases:
            shown = (argv[1].split(b' HTTP/')[0].decode() if argv[0] == 'HTTP' else
                     f"[{argv[1]['kind']} at {argv[1]['at']}] {' '.join(argv[1]['argv'])}" if argv[0] == 'FAULT' else
                     ' '.join(argv))
            print(f"{name:<62} {shown}")
        print(f"{len(cases)} cases")
        return 0
    if not cases:
        sys.exit(f"no case name contains {' or '.join(map(repr, args.only))} (--list shows them)")

    git_status = lambda: subprocess.run(['git', 'status', '--porcelain', '--untracked-files=all'], cwd=REPO,
                                        capture_output=True, text=True).stdout
    status_before = git_status()
    t0 = time.time()
    root = tempfile.mkdtemp(prefix='mirim-bad-inputs-')
    server = None
    try:
        fx = build_fixtures(root)
        server = None
        if any(name.startswith('serve.py:') for name, _, _ in cases):
            server, fx['serve_port'] = start_server(fx, root)
            fx['busy_port'] = str(fx['serve_port'])
        print(f"fixtures in {time.time() - t0:.0f}s; running {len(cases)} cases, {args.jobs} at a time, "
              f"{args.timeout:.0f}s each at most", flush=True)
        results = {}
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_case, case, fx, root, args.timeout): case[0] for case in cases}
            for future, name in futures.items():  # in the order of CASES
                results[name] = outcome, shown, tail, seconds = future.result()
                if outcome != 'clear' or args.all:
                    print(f"{outcome.upper():<9} {name}\n          $ {shown}\n          -> {tail[:300]}", flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    counts = Counter(outcome for outcome, *_ in results.values())
    scripts = sorted({name.split(':')[0] for name in results}, key=lambda s: names.index(next(
        n for n in names if n.startswith(s + ':'))))
    print(f"\n{'script':<20}" + ''.join(f"{o:>10}" for o in OUTCOMES) + f"{'cases':>8}")
    for script in scripts:
        per = Counter(o for n, (o, *_) in results.items() if n.split(':')[0] == script)
        print(f"{script:<20}" + ''.join(f"{per[o]:>10}" for o in OUTCOMES) + f"{sum(per.values()):>8}")
    print(f"{'all':<20}" + ''.join(f"{counts[o]:>10}" for o in OUTCOMES) + f"{len(results):>8}")
    print(f"{len(results)} cases in {time.time() - t0:.0f}s (the slowest {max(r[3] for r in results.values()):.0f}s)")
    if git_status() != status_before:
        print(f"warning: the cases changed the repository (git status):\n{git_status()}")
    return 0 if counts['clear'] == len(results) else 1


if __name__ == '__main__':
    sys.exit(main())
