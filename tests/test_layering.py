"""The house rules, read from the code (imports inside functions count too): a command (a file with
`if __name__ == '__main__':`) is never imported by another file for a helper (bench.py may import what
it measures), the library mirim/ never imports a command, and no files import each other round a circle.
../shared/tools/layering.py prints the same findings for a reader; this test keeps them from coming back."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {'.git', '.venv', 'tests', 'out', '__pycache__', 'wandb'}


def project_modules():
    """{dotted name: path} of every .py file of the project (tests and virtual environments left out)."""
    found = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP and not d.startswith('.')]
        for name in files:
            if name.endswith('.py'):
                dotted = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, '.')
                found[dotted.removesuffix('.__init__')] = os.path.join(folder, name)
    return found


def imported(path, modules):
    """The project modules the file imports, anywhere in it (`from mirim import run` names mirim.run)."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {f'{node.module}.{alias.name}' for alias in node.names} | {node.module}
    found = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition('.')[0]
        if name:
            found.add(name)
    return found


def is_command(path):
    text = open(path, encoding='utf-8').read()
    return "__name__ == '__main__'" in text or '__name__ == "__main__"' in text


def import_graph():
    modules = project_modules()
    graph = {name: imported(path, modules) - {name, 'mirim'} for name, path in modules.items()}
    commands = {name for name, path in modules.items() if is_command(path) and name != 'model'}
    return graph, commands


def test_no_command_is_imported_for_a_helper():
    graph, commands = import_graph()
    assert len(commands) > 10 and 'train' in commands and 'mirim.run' in graph  # the walk found the project
    misuses = sorted(f'{a} imports {b}' for a, targets in graph.items() for b in targets
                     if b in commands and a != 'bench')
    assert misuses == []


def test_the_library_imports_no_command_and_only_model_py_from_the_top():
    graph, commands = import_graph()
    outside = sorted(f'{a} imports {b}' for a, targets in graph.items() if a.startswith('mirim')
                     for b in targets if not b.startswith('mirim') and b != 'model')
    assert outside == []


def test_no_import_circle():
    graph, _ = import_graph()

    def reaches(start, goal, seen):
        for nxt in graph.get(start, ()):
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if reaches(nxt, goal, seen):
                    return True
        return False
    circles = sorted(name for name in graph if reaches(name, name, set()))
    assert circles == []


def test_the_checker_sees_a_circle_and_a_command_import(tmp_path, monkeypatch):
    """The rules above can fail: a made-up project with a circle and a command imported for a helper."""
    (tmp_path / 'a.py').write_text('def f():\n    from b import g\n')
    (tmp_path / 'b.py').write_text('import a\n')
    (tmp_path / 'cmd.py').write_text("x = 1\nif __name__ == '__main__':\n    pass\n")
    (tmp_path / 'user.py').write_text('from cmd import x\n')
    monkeypatch.setattr(__import__(__name__), 'ROOT', str(tmp_path))
    graph, commands = import_graph()
    assert graph['a'] == {'b'} and graph['b'] == {'a'} and commands == {'cmd'} and graph['user'] == {'cmd'}
