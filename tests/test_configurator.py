import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mirim.configurator import ConfigError, configure  # noqa: E402

DEFAULTS = {'out_dir': 'out', 'batch_size': 16, 'learning_rate': 1e-3, 'compile': False, 'n_layer': None}


def write(tmp_path, text, name='cfg.py'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_come_back_unchanged_without_arguments():
    assert configure(DEFAULTS, []) == DEFAULTS


def test_override_is_parsed_as_a_python_literal():
    assert configure(DEFAULTS, ['--batch_size=32', '--compile=True'])['batch_size'] == 32


def test_override_that_is_not_a_literal_is_a_string():
    assert configure(DEFAULTS, ['--out_dir=out/run-1'])['out_dir'] == 'out/run-1'


def test_config_file_sets_keys(tmp_path):
    assert configure(DEFAULTS, [write(tmp_path, "batch_size = 8\nout_dir = 'out/x'\n")])['batch_size'] == 8


def test_later_arguments_win(tmp_path):
    config = configure(DEFAULTS, [write(tmp_path, "batch_size = 8\n"), '--batch_size=4'])
    assert config['batch_size'] == 4


def test_config_file_sees_the_config_so_far(tmp_path):
    config = configure(DEFAULTS, ['--out_dir=out/a', write(tmp_path, "out_dir = out_dir + '-big'\n")])
    assert config['out_dir'] == 'out/a-big'


def test_config_file_may_import_and_define_helpers(tmp_path):
    text = "import math\n_width = 3\ndef twice(x):\n    return 2 * x\nbatch_size = twice(_width)\n"
    assert configure(DEFAULTS, [write(tmp_path, text)])['batch_size'] == 6


def test_unknown_key_names_it_and_the_closest_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_sise'; did you mean batch_size"):
        configure(DEFAULTS, ['--batch_sise=3'])


def test_unknown_key_in_a_config_file_names_the_file(tmp_path):
    path = write(tmp_path, "learning_rat = 0.1\n")
    with pytest.raises(ConfigError, match=r"cfg\.py: unknown config key 'learning_rat'.*learning_rate"):
        configure(DEFAULTS, [path])


def test_wrong_type_names_key_expected_and_given_types():
    with pytest.raises(ConfigError, match=r"batch_size expects int .* got str 'many'"):
        configure(DEFAULTS, ['--batch_size=many'])


def test_int_is_accepted_where_a_float_is_expected():
    value = configure(DEFAULTS, ['--learning_rate=1'])['learning_rate']
    assert value == 1.0 and type(value) is float


def test_float_is_refused_where_an_int_is_expected():
    with pytest.raises(ConfigError, match='expects int'):
        configure(DEFAULTS, ['--batch_size=2.5'])


def test_bool_is_refused_where_an_int_is_expected():
    with pytest.raises(ConfigError, match='got bool'):
        configure(DEFAULTS, ['--batch_size=True'])


def test_key_whose_default_is_none_takes_any_value():
    assert configure(DEFAULTS, ['--n_layer=12'])['n_layer'] == 12


def test_missing_config_file_is_an_error():
    with pytest.raises(ConfigError, match='not found'):
        configure(DEFAULTS, ['config/does_not_exist.py'])


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match=r"--batch_size=VALUE"):
        configure(DEFAULTS, ['--batch_size'])


def test_bare_flag_switches_a_boolean_on():
    assert configure(DEFAULTS, ['--compile'])['compile'] is True


def test_a_text_setting_takes_numbers_and_dots_as_typed():
    config = configure({'start': '', 'batch_size': 8}, ['--start=1984', '--start=...'])
    assert config['start'] == '...'
    assert configure({'start': ''}, ['--start=1984'])['start'] == '1984'



# -----------------------------------------------------------------------------
# --key value, lists, required keys and choices: the forms the data commands and tools take

def test_key_space_value_is_the_same_as_key_equals_value(tmp_path):
    config = configure(DEFAULTS, ['--batch_size', '32', '--out_dir', 'out/x', '--learning_rate', '-1e-4', '--compile'])
    assert [config[k] for k in ('batch_size', 'out_dir', 'learning_rate', 'compile')] == [32, 'out/x', -1e-4, True]
    assert configure({'start': ''}, ['--start', '1984'])['start'] == '1984'  # text keeps what was typed
    config = configure(DEFAULTS, ['--compile', write(tmp_path, "batch_size = 8\n")])  # a bare flag takes no value
    assert config['compile'] is True and config['batch_size'] == 8


def test_a_list_setting_takes_the_values_up_to_the_next_option():
    defaults = {'input': [], 'out': '', 'overwrite': False}
    config = configure(defaults, ['--input', 'a.txt', 'b 2.txt', '--out', 'data/x', '--overwrite'])
    assert config == {'input': ['a.txt', 'b 2.txt'], 'out': 'data/x', 'overwrite': True}
    assert configure(defaults, ['--input=a.txt'])['input'] == ['a.txt']
    assert configure(defaults, ['--input=1984'])['input'] == ['1984']
    assert configure(defaults, ["--input=['a', 'b']"])['input'] == ['a', 'b']
    assert configure({'tokens': ('<a>',)}, ['--tokens', '<b>', '<c>'])['tokens'] == ('<b>', '<c>')


def test_a_key_without_a_value_still_says_how_to_give_one():
    with pytest.raises(ConfigError, match=r"--batch_size: give it a value: --batch_size=VALUE or --batch_size VALUE"):
        configure(DEFAULTS, ['--batch_size', '--compile'])


def test_unknown_key_without_equals_names_the_closest_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_sise'; did you mean batch_size"):
        configure(DEFAULTS, ['--batch_sise', '3'])


def test_a_required_key_left_empty_names_it_with_its_comment(tmp_path):
    source = write(tmp_path, "DEFAULTS = dict(\n    input=[],  # text files or globs\n    out='',  # the data folder "
                             "to write\n)\n", name='script.py')
    defaults = {'input': [], 'out': ''}
    with pytest.raises(ConfigError, match=r"^give --out: the data folder to write$"):
        configure(defaults, ['--input', 'a.txt'], help_source=source, required=('input', 'out'))
    with pytest.raises(ConfigError, match=r"^give --input$"):
        configure(defaults, [], required=('input', 'out'))
    assert configure(defaults, ['--input', 'a', '--out', 'b'], required=('input', 'out'))['out'] == 'b'


def test_a_choice_outside_its_values_lists_them():
    defaults = {'doc_per': 'block', 'template': ''}
    choices = {'doc_per': ['block', 'line', 'file'], 'template': ['aira', 'chatml']}
    with pytest.raises(ConfigError, match=r"^--doc_per=page: choose block, line or file$"):
        configure(defaults, ['--doc_per', 'page'], choices=choices)
    assert configure(defaults, ['--doc_per=line'], choices=choices) == {'doc_per': 'line', 'template': ''}


def test_help_names_the_required_keys_in_its_usage(capsys):
    with pytest.raises(SystemExit):
        configure({'input': [], 'out': ''}, ['-h'], required=('input', 'out'))
    assert capsys.readouterr().out.splitlines()[0].endswith(' --input=... --out=... [config.py ...] [--key=value ...]')

# -----------------------------------------------------------------------------
# a config file that cannot be run is one line naming the file (and the line), never a traceback

def test_config_file_with_a_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "batch_size = 8\nout_dir = 'out/x\n")
    with pytest.raises(ConfigError, match=r"cfg\.py:2: syntax error: unterminated string"):
        configure(DEFAULTS, [path])


def test_config_file_with_a_name_error_names_file_line_and_exception(tmp_path):
    path = write(tmp_path, "batch_size = 8\nout_dir = base + '/x'\n")
    with pytest.raises(ConfigError, match=r"cfg\.py:2: NameError: name 'base' is not defined"):
        configure(DEFAULTS, [path])


def test_config_file_whose_call_raises_names_its_own_line(tmp_path):
    path = write(tmp_path, "import json\n\nbatch_size = json.loads('eight')\n")  # raised inside json, not the file
    with pytest.raises(ConfigError, match=r"cfg\.py:3: JSONDecodeError: Expecting value"):
        configure(DEFAULTS, [path])


def test_config_file_that_is_not_utf8_is_an_error(tmp_path):
    path = tmp_path / 'latin1.py'
    path.write_bytes("batch_size = 8\nout_dir = 'saída'\n".encode('latin-1'))
    with pytest.raises(ConfigError, match=r"latin1\.py:2: config file is not UTF-8 text"):
        configure(DEFAULTS, [str(path)])


def test_config_file_with_a_null_byte_is_an_error(tmp_path):
    path = tmp_path / 'null.py'
    path.write_bytes(b"batch_size = 8\x00\n")
    with pytest.raises(ConfigError, match=r"null\.py.*null bytes"):
        configure(DEFAULTS, [str(path)])


def test_directory_given_as_a_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"is a directory, not a config file"):
        configure(DEFAULTS, [str(tmp_path)])


def test_train_py_reports_a_broken_config_file_in_one_line(tmp_path):
    path = write(tmp_path, "batch_size = 8\nlearning_rate = lr / 10\n")
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), path], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, 'WANDB_MODE': 'disabled'})
    assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [f"train.py: error: {path}:2: NameError: name 'lr' is not defined"]


# -----------------------------------------------------------------------------
# --help: every key with its default and the comment beside it in the script

def test_help_prints_keys_defaults_and_the_comments_beside_them(tmp_path, capsys):
    source = write(tmp_path, "# I/O\n"
                             "out_dir = 'out'   # where the # checkpoints go\n"
                             "                  # (and the log)\n"
                             "# ----------\n"
                             "# optimizer\n"
                             "batch_size = 16\n"
                             "learning_rate = 1e-3  # peak\n"
                             "SETTINGS = dict(\n"
                             "    compile=False,    # torch.compile\n"
                             "    n_layer=None,\n"
                             ")\n", name='script.py')
    for flag in ('--help', '-h'):
        with pytest.raises(SystemExit) as exit:
            configure(DEFAULTS, ['--batch_size=3', flag], help_source=source, usage='usage: script.py [--key=value]')
        assert exit.value.code == 0
        assert capsys.readouterr().out.splitlines() == [
            'usage: script.py [--key=value]',
            'I/O',
            "  --out_dir='out'        where the # checkpoints go (and the log)",
            '',
            'optimizer',
            '  --batch_size=16',
            '  --learning_rate=0.001  peak',
            '  --compile=False        torch.compile',
            '  --n_layer=None']


def test_help_without_a_source_still_lists_the_keys(capsys):
    with pytest.raises(SystemExit):
        configure(DEFAULTS, ['--help'])
    out = capsys.readouterr().out
    assert out.startswith('usage: python ') and "  --out_dir='out'" in out and '  --n_layer=None' in out


HELP = {  # script -> lines its --help must show: a key, its default and the comment beside it
    'train.py': ["--learning_rate=0.001", "--grad_clip=1.0 ", "clip the global gradient norm to this; 0 = no clipping",
                 "--init_from='scratch' ", "(out_dir/ckpt.pt) | a mirim checkpoint (file or out_dir) or a Hugging",
                 "optimizer: AdamW, weight decay on matrices only"],
    'sample.py': ["--temperature=0.8 ", "0 = greedy (always the most likely token)", "--chat=False "],
    'eval.py': ["--task='' ", "'' = loss; 'biblia-<lang>' = built-in verse task", "--n=500 "],
    'plan.py': ["--gpu='' ", "A100 | H100 | H100-PCIe | H200", "--learning_rate=0.001", "--max_iters=5000 ",
                "optimizer steps in all"],
    'export.py': ["--dest='' ", "the Hugging Face folder to write", "--check_tokenizer=True "],
    'classify.py': ["--freeze_backbone=False ", "True: train only the head (a linear probe)"],
    'bench.py': ["--what='all' ", "train | generate | loop | all", "--loop_iters=60"],
    'data/prepare.py': ["--input=[] ", "--overwrite=False ", "the data folder to write, e.g. data/mycorpus"],
    'tokenizer.py': ["--model_type='bpe' ", "--special_tokens=['<|im_start|>', '<|im_end|>']"],
    'data/biblia/make_tasks.py': ["--what='' ", "chat | classify | pref"],
    'plot.py': ["--x='tokens' ", "tokens | step | minutes"],
}


# Runs each script as `python SCRIPT ARGS...` would (its __main__ block, with sys.argv set), all in one
# subprocess so that torch is imported once, not once per script -> {label: [exit code, stdout]}.
DRIVER = """
import contextlib, io, json, runpy, sys
results = {}
for label, argv in json.loads(sys.argv[1]).items():
    sys.argv, out, code = argv, io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(argv[0], run_name='__main__')
    except SystemExit as e:
        code = e.code
    except BaseException as e:
        code = f'Traceback: {type(e).__name__}: {e}'
    results[label] = [code, out.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    broken = write(tmp_path_factory.mktemp('broken'), "batch_size = 8\nlearning_rate = lr / 10\n")
    commands = {script: [script, '--help'] for script in HELP}
    commands['bench.py broken'] = ['bench.py', broken]
    env = {**os.environ, 'WANDB_MODE': 'disabled', 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}
    result = subprocess.run([sys.executable, '-c', DRIVER, json.dumps(commands)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return {**json.loads(result.stdout.splitlines()[-1]), 'broken': broken}


@pytest.mark.parametrize('script', list(HELP))
def test_every_script_prints_its_keys_with_help(runs, script):
    code, out = runs[script]
    assert code == 0, code
    assert out.startswith(f'usage: python {script} ')
    for text in HELP[script]:
        assert text in out, f"{text!r} not in {script} --help:\n{out}"


def test_bench_py_reports_a_broken_config_file_in_one_line(runs):
    assert runs['bench.py broken'][0] == f"bench.py: error: {runs['broken']}:2: NameError: name 'lr' is not defined"
