"""
Exact match of a chat model's greedy answers, as `sample.py --chat --temperature=0` gives them, on questions
with one right short answer (make_tasks.py questions writes them: the testament question on verses of the
held-out books, which no training step saw), beside the constant-answer baseline and as balanced accuracy;
with --before, a paired test of the two models on the same questions (McNemar's exact test).

    python data/biblia/make_tasks.py questions                     # -> data/biblia/pt-questions/{train,test}.jsonl
    python data/biblia/exact_match.py --model out/biblia-pt-chat --before out/biblia-pt --template chatml
    python data/biblia/exact_match.py --model out/biblia-pt-dpo --before out/biblia-pt-chat --json dpo.json

An answer counts when its text, stripped, equals the right one ("Do Novo Testamento."). Balanced accuracy
is the mean over the right answers of the share answered right: a model that always says "Do Antigo
Testamento." scores 50% on two answers, whatever their mix. A base model (no chat template) is asked in
--template's format (it never learned it: that is its score before fine-tuning). --json writes the
scores and every answer, so runs can be compared later.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from mirim.answers import greedy_answers, is_right, mcnemar, read_questions, score, score_lines  # noqa: E402
from mirim.atomic import claim_file, write_json  # noqa: E402
from mirim.chat import get_template  # noqa: E402
from mirim.checkpoint import load_model  # noqa: E402
from mirim.configurator import settings  # noqa: E402
from mirim.corpus import PrepareError  # noqa: E402

DEFAULTS = dict(
    model='',                 # a chat checkpoint or out_dir
    checkpoint='ckpt.pt',     # file inside the out_dir: ckpt.pt (latest) or best.pt
    questions=os.path.join(HERE, 'pt-questions', 'test.jsonl'),  # held-out questions (make_tasks.py questions)
    tasks='',                 # the tasks to ask, comma-separated; '' = every question of the file
    before='',                # a second model (the one --model started from) for a paired before/after test, or the
                              # --json of an earlier run on the same questions (its answers, not asked again)
    template='',              # the chat template to ask a model that has none in (a base model, --model or --before): chatml
    json='',                  # write the scores and answers here (JSON)
    overwrite=False,          # replace an existing --json file
)


def ask(path, checkpoint, questions, template=None):
    """-> the greedy answers of the model at path, or exit with one line."""
    try:
        model, tokenizer, _ = load_model(path, checkpoint=checkpoint)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not tokenizer.chat_template and not template:
        sys.exit(f"error: {path} has no chat template: give a chat (SFT or DPO) model, or for a base model the "
                 f"format to ask it in (--template chatml)")
    try:
        return greedy_answers(model, tokenizer, [q['prompt'] for q in questions],
                              template=None if tokenizer.chat_template else template, desc=f"asking {path}")
    except ValueError as e:  # a template whose markers the tokenizer lacks
        sys.exit(f"error: {path}: {e}")


def answers_from_json(path, questions):
    """The --model answers an earlier --json holds, when it asked the same questions; else exit with one line."""
    try:
        with open(path, encoding='utf-8') as f:
            earlier = json.load(f)
        answers, prompts = earlier['after']['answers'], earlier['prompts']
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"error: --before {path}: not a --json of exact_match.py ({e})")
    if prompts != [q['prompt'] for q in questions] or len(answers) != len(questions):
        sys.exit(f"error: --before {path} answered other questions than {len(questions)} of these: a paired test needs "
                 f"the same ones")
    return earlier['after']['model'], answers


def main(argv=None):
    args = settings(DEFAULTS, argv, help_source=__file__, required=('model',))
    tasks = set(args.tasks.split(',')) if args.tasks else None
    try:  # what can be refused is refused before any model is asked
        if args.template:
            get_template(args.template)
        if args.json:
            claim_file(args.json, args.overwrite, '--json')
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not os.path.isfile(args.questions):
        sys.exit(f"error: no questions file {args.questions}: build it with python data/biblia/make_tasks.py questions")
    try:
        questions = read_questions(args.questions, tasks)
    except PrepareError as e:
        sys.exit(f"error: {e}")
    if not questions:
        sys.exit(f"error: no questions{f' of the tasks {sorted(tasks)}' if tasks else ''} in {args.questions}")
    runs = {'after': (args.model, ask(args.model, args.checkpoint, questions, args.template or None))}
    if args.before.endswith('.json'):
        runs['before'] = answers_from_json(args.before, questions)
    elif args.before:
        runs['before'] = (args.before, ask(args.before, args.checkpoint, questions, args.template or None))
    result = {'questions': args.questions, 'asked': len(questions), 'prompts': [q['prompt'] for q in questions]}
    for name in ('before', 'after'):
        if name in runs:
            path, answers = runs[name]
            s = score(questions, answers)
            print('\n'.join(score_lines(f"{name if args.before else 'score'} ({path})", s)))
            result[name] = {'model': path, **s, 'per_answer': {g: list(v) for g, v in s['per_answer'].items()},
                            'answers': answers, 'right': [is_right(q, a) for q, a in zip(questions, answers)]}
    if args.before:
        b, c, p = mcnemar(result['before']['right'], result['after']['right'])
        print(f"paired, same {len(questions)} questions: {c} right only after, {b} right only before; "
              f"McNemar exact p = {p:.3g}")
        result['mcnemar'] = {'right_only_before': b, 'right_only_after': c, 'p': p}
    if args.json:
        write_json(args.json, result)


if __name__ == '__main__':
    main()
