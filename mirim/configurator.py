"""
Options for every command: defaults, then config files, then --key=value.

    python train.py config/train_biblia_pt.py --batch_size=32 --out_dir=out/try
    python data/prepare.py --input a.txt b.txt --tokenizer train:8192 --out data/x --overwrite

Arguments apply left to right. A config file is plain Python run top to bottom; the names it sets
must be config keys (it may also import modules and define helpers or names starting with '_').
It sees the config so far, so `out_dir = out_dir + '-big'` works. A --key=value is parsed with
ast.literal_eval (3e-4, True, None, 'x' all work) and falls back to the plain string, so
--out_dir=out/x needs no quotes; a text setting keeps what was typed (--start=1984 is '1984').
--key value (the next argument, when it does not start with --) is the same as --key=value; a bare
--flag switches a boolean on. A setting whose default is a list takes every following argument up
to the next --option (--input a.txt b.txt); --key=a gives ['a'], --key=['a', 'b'] the list.
An unknown key or a value of the wrong type is an error that says what was expected: a typo must
never silently train the wrong model. A command may name required keys (left at their empty
default: "give --out: <its comment>") and choices ({key: values}: "--key=x: choose a, b or c").
A config file that cannot be run (a syntax error, an exception, bytes that are not UTF-8) is a
one-line error naming its file and line. --help (or -h) prints every key with its default and the
comment beside it in the script.
"""

import ast
import difflib
import io
import os
import sys
import tokenize
from types import SimpleNamespace
import types


class ConfigError(ValueError):
    """A config file or --key=value that cannot be used; the message says why."""


def settings(defaults, argv=None, help_source=None, **options):
    """configure() for a command line (argv None: sys.argv[1:]) -> a namespace; a setting that cannot be used
    exits with its one line, named after the command."""
    try:
        return SimpleNamespace(**configure(defaults, sys.argv[1:] if argv is None else argv, help_source, **options))
    except ConfigError as e:
        raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'mirim'}: error: {e}") from None


def configure(defaults, argv, help_source=None, usage=None, required=(), choices=None):
    """Resolve `argv` (config file paths, --key=value or --key value, --flag for a boolean, --key A B for a list)
    against `defaults` -> a new dict. A key whose default is None takes any value; otherwise the type must match
    the default's (an int is accepted, and converted, where a float is expected), or be one of the key's `choices`
    (so a boolean can also take 'auto'). Each key of `required` must be given (a value other than its default), each
    key of `choices` ({key: [values]}) one of its values (or its default). --help or -h anywhere prints `usage` and the keys, with the comments written beside them in the
    file `help_source`, and exits."""
    if ('--help' in argv or '-h' in argv) and 'help' not in defaults:
        print(usage or ' '.join([f"usage: python {sys.argv[0] or 'script.py'}", *(f"--{key}=..." for key in required),
                                 "[config.py ...] [--key=value ...]"]))
        print(describe(defaults, help_source))
        raise SystemExit(0)
    config, args = dict(defaults), list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith('--'):
            for key, value in run_config_file(arg, config).items():
                config[key] = checked(defaults, key, value, arg, (choices or {}).get(key, ()))
            continue
        key, equals, text = arg[2:].partition('=')
        default = defaults.get(key)
        if key not in defaults:
            checked(defaults, key, None, f"--{key}")  # raises: an unknown key, with the closest ones
        if isinstance(default, (list, tuple)):  # --input a.txt b.txt, --input=a.txt, --input=['a.txt']
            value = parse_value(text) if equals else []
            value = value if isinstance(value, list) else [text]
            while not equals and args and not args[0].startswith('--'):
                value.append(args.pop(0))
            value = type(default)(value)
        else:
            if not equals and isinstance(default, bool):
                text = 'True'  # a bare --flag switches a boolean on: --compile, --chat
            elif not equals and args and not args[0].startswith('--'):
                text = args.pop(0)  # --key value
            elif not equals:
                raise ConfigError(f"{arg}: give it a value: --{key}=VALUE or --{key} VALUE")
            value = parse_value(text)
            if isinstance(default, str) and not isinstance(value, str):
                value = text  # a text setting takes what was typed: --start=1984, --start=...
        config[key] = checked(defaults, key, value, f"--{key}", (choices or {}).get(key, ()))
    for key in required:
        if config[key] == defaults[key]:
            note = comments(help_source).get(key, ([], ''))[1] if help_source else ''
            raise ConfigError(f"give --{key}" + (f": {note}" if note else ''))
    for key, allowed in (choices or {}).items():
        if config[key] != defaults[key] and config[key] not in allowed:
            *first, last = map(str, allowed)
            raise ConfigError(f"--{key}={config[key]}: choose {', '.join(first)} or {last}")
    return config


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string: --out_dir=out/x, --init_from=resume


def run_config_file(path, config):
    """Run a config file with the config so far in scope -> {name: value} for the names it set."""
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a directory, not a config file")
    if not os.path.isfile(path):
        hint = " (--key=value arguments start with two dashes)" if '=' in path else ""
        raise ConfigError(f"config file {path} not found{hint}")
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b'\n') + 1
        raise ConfigError(f"{path}:{line}: config file is not UTF-8 text ({e.reason}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    try:
        code = compile(source, path, 'exec')
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except ValueError as e:  # null bytes, on Pythons before 3.12
        raise ConfigError(f"{path}: {e}") from None
    namespace = dict(config)
    try:
        exec(code, namespace)
    except Exception as e:  # the user's code: say where it failed in their file, not a traceback through ours
        tb, line = e.__traceback__, None
        while tb is not None:  # the innermost frame in the config file itself (it may have called a helper)
            if tb.tb_frame.f_code.co_filename == path:
                line = tb.tb_lineno
            tb = tb.tb_next
        where = f"{path}:{line}" if line else path
        raise ConfigError(f"{where}: {type(e).__name__}: {e}") from None
    helpers = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)
    imported = imported_names(ast.parse(source, path))  # it compiled, so it parses
    return {name: value for name, value in namespace.items()
            if not name.startswith('_') and not isinstance(value, helpers) and (name not in imported or name in config)
            and (name not in config or value is not config[name])}


def imported_names(tree):
    """The names a config file binds by import statements only (`from math import pi`, `import numpy as np`):
    helpers, not settings, whatever their value (a float pi as much as a module). A name that is also assigned
    (`pi = pi / 2`) stays a setting, and so does an imported name that is a setting (`from base import
    batch_size`): run_config_file keeps those."""
    imported, assigned = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name != '*':
                    imported.add(alias.asname or alias.name.split('.')[0])
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            assigned.add(node.id)
    return imported - assigned


def checked(defaults, key, value, source, allowed=()):
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(defaults))}"
        raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
    default = defaults[key]
    if default is None or type(value) is type(default) or any(type(value) is type(a) and value == a for a in allowed):
        return value
    if type(default) is float and type(value) is int:  # bool is not accepted as a number
        return float(value)
    if allowed:
        *first, last = map(str, allowed)
        where = f"--{key}={value}" if source == f"--{key}" else f"{source}: {key} = {value!r}"
        raise ConfigError(f"{where}: choose {', '.join(first)} or {last}")
    raise ConfigError(f"{source}: {key} expects {type(default).__name__} (default {default!r}), "
                      f"got {type(value).__name__} {value!r}")


def print_config(config, print_fn=print, width=110):
    """Print every key = value, several to a line."""
    line = ''
    for key in config:
        item = f"{key}={config[key]!r}"
        if line and len(line) + 2 + len(item) > width:
            print_fn(line)
            line = ''
        line = f"{line}  {item}" if line else item
    if line:
        print_fn(line)


def comments(path):
    """{name: (heading, comment)} for the config keys declared at the top level of the Python file `path`
    (or of several files: the first that declares a key with a comment gives it):
    `key = value`, or `key=value,` inside `DEFAULTS = dict(...)`. The comment is the # comment ending its
    line, joined with the comment-only lines below that continue it (their # in the same column); the
    heading, the comment-only lines just above it in the key's own column (a section: '# optimizer: ...')."""
    if isinstance(path, (list, tuple)):
        return {k: v for one in reversed(path) for k, v in comments(one).items() if v[1] or v[0]}
    with open(path, encoding='utf-8') as f:
        source = f.read()
    found = {}  # line -> (column, text, comment only?); tokenize, so a '#' inside a string is no comment
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            only = not token.line[:token.start[1]].strip()
            found[token.start[0]] = (token.start[1], token.string.lstrip('#').strip(), only)
    comment_only = lambda line, column: line in found and found[line][2] and found[line][0] == column
    declared = []  # (name, its ast node, the line its value ends on)
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            declared += [(t.id, t, node.end_lineno) for t in node.targets if isinstance(t, ast.Name)]
            if isinstance(node.value, ast.Call):
                declared += [(k.arg, k, k.value.end_lineno) for k in node.value.keywords if k.arg]
    result = {}
    for name, node, line in declared:
        heading, above = [], node.lineno - 1
        while comment_only(above, node.col_offset):
            if any(c.isalnum() for c in found[above][1]):  # not a # ------ rule
                heading.insert(0, found[above][1])
            above -= 1
        comment = ''
        if line in found and not found[line][2]:
            column, comment, _ = found[line]
            while comment_only(line + 1, column):
                line += 1
                comment += ' ' + found[line][1]
        result.setdefault(name, (heading, comment))
    return result


def describe(defaults, source=None):
    """One line per key: --key=default, then the comment beside it in the file `source` (if given),
    under the section headings written above the keys."""
    notes = comments(source) if source else {}
    items = [f"  --{key}={value!r}" for key, value in defaults.items()]
    width = min(40, max(map(len, items), default=0))
    lines = []
    for key, item in zip(defaults, items):
        heading, comment = notes.get(key, ([], ''))
        lines += ([''] if heading and lines else []) + heading
        lines.append(f"{item:<{width}}  {comment}".rstrip())
    return '\n'.join(lines)
