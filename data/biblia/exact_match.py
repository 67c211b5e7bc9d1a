"""
Exact-match accuracy of a chat model's greedy answers, as `sample.py --chat --temperature=0` gives
them, on questions with one right short answer: the held-out book and testament questions of the
preference set (make_tasks.py pref writes them to data/biblia/pt-pref/val.jsonl: "prompt", "chosen").

    python data/biblia/exact_match.py --model out/biblia-pt-chat
    python data/biblia/exact_match.py --model out/biblia-pt-dpo --questions data/biblia/pt-pref/val.jsonl

An answer counts when its text, stripped, equals the right one ("Em Gênesis.", "Do Novo Testamento.").
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from mirim.chat import chat_ids, stop_id  # noqa: E402
from mirim.checkpoint import load_model  # noqa: E402
from mirim.configurator import settings  # noqa: E402
from mirim.sampling import continuation_text, make_generator, stream_sample  # noqa: E402

SHORT_TASKS = ('book', 'testament')


def exact_match(model, tokenizer, questions, max_new_tokens=24):
    """-> {task: (right, asked)} and the answers, for [{'task', 'prompt', 'chosen'}]; greedy, one at a time,
    each answer ending at the template's stop marker, as in sample.py --chat."""
    template = tokenizer.chat_template
    stop = stop_id(template, tokenizer)
    scores, answers = {}, []
    for q in questions:
        ids, _ = chat_ids([{'role': 'user', 'content': q['prompt']}], template, tokenizer, add_generation_prompt=True)
        reply = stream_sample(model, tokenizer, ids, max_new_tokens, make_generator('cpu', 0), lambda piece: None,
                              stop_ids=(stop,), temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
        answer = continuation_text(tokenizer, ids, reply).strip()
        right, asked = scores.get(q['task'], (0, 0))
        scores[q['task']] = (right + (answer == q['chosen'].strip()), asked + 1)
        answers.append(answer)
    return scores, answers


DEFAULTS = dict(
    model='',                 # a chat checkpoint or out_dir
    checkpoint='ckpt.pt',     # file inside the out_dir: ckpt.pt (latest) or best.pt
    questions=os.path.join(HERE, 'pt-pref', 'val.jsonl'),  # the held-out questions (make_tasks.py pref writes them)
    tasks=','.join(SHORT_TASKS),  # the tasks to ask, comma-separated
)


def main(argv=None):
    args = settings(DEFAULTS, argv, help_source=__file__, required=('model',))
    tasks = args.tasks.split(',')
    if not os.path.isfile(args.questions):
        sys.exit(f"error: no questions file {args.questions}: build it with python data/biblia/make_tasks.py pref")
    try:
        with open(args.questions, encoding='utf-8') as f:
            questions = [q for q in map(json.loads, filter(str.strip, f)) if q.get('task') in tasks]
    except (ValueError, AttributeError) as e:  # not JSONL, or lines that are not objects
        sys.exit(f"error: {args.questions} is not the JSONL make_tasks.py pref writes ({e})")
    if not questions:
        sys.exit(f"error: no questions of the tasks {tasks} in {args.questions}")
    try:
        model, tokenizer, _ = load_model(args.model, checkpoint=args.checkpoint)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not tokenizer.chat_template:
        sys.exit(f"error: {args.model} has no chat template: give a chat (SFT or DPO) model")
    scores, _ = exact_match(model, tokenizer, questions)
    right = sum(r for r, _ in scores.values())
    for task, (r, n) in sorted(scores.items()):
        print(f"{task}: {r}/{n} = {r / n:.1%}")
    print(f"all: {right}/{len(questions)} = {right / len(questions):.1%} exact ({args.model})")


if __name__ == '__main__':
    main()
