"""
Questions with one right short answer, put to a chat model: its greedy answers (as `sample.py --chat
--temperature=0` gives them) and how to score them honestly: exact match beside the constant-answer
baseline, balanced accuracy (the mean over the right answers of the share of questions answered right,
so a model that always gives the commonest answer scores 1/classes, not the commonest answer's share),
and a paired test of two models on the same questions (McNemar's exact test). data/biblia/exact_match.py
scores with it; data/biblia/make_tasks.py pref --from_model builds on-policy preference pairs with it.

A question is a dict {'prompt': str, 'chosen': the right answer, 'task': optional name}; the JSONL that
make_tasks.py questions writes holds them, one a line.
"""

import math
import sys

from tqdm import tqdm

from mirim.chat import chat_ids, get_template, stop_id
from mirim.corpus import jsonl_records, PrepareError
from mirim.sampling import continuation_text, generate_batch


def read_questions(path, tasks=None):
    """-> [question] from a JSONL file, those of `tasks` only when given. PrepareError (file:line) for a line
    that is not a question."""
    questions = []
    for where, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get('prompt'), str) \
                or not isinstance(record.get('chosen'), str) or not record['chosen'].strip():
            raise PrepareError(f"{where}: not a question: each line must be {{\"prompt\": str, \"chosen\": the right "
                               f"answer, \"task\": optional name}}")
        if tasks is None or record.get('task') in tasks:
            questions.append(record)
    return questions


def greedy_answers(model, tokenizer, prompts, template=None, max_new_tokens=24, batch_size=64, desc='answering'):
    """The model's greedy answer to each prompt (one user turn), stripped, each ending at the template's stop
    marker (or <eos>), as sample.py --chat --temperature=0 answers. Prompts of similar length are answered
    together, batch_size at a time, left-padded (the padding is masked; the argmax can differ from a batch of
    one only where two tokens tie to float rounding). template: the model's own (None) or a name, to ask a
    model never fine-tuned on one (a base model) in that format."""
    template = get_template(template or tokenizer.chat_template)
    stop = stop_id(template, tokenizer)
    encoded = [chat_ids([{'role': 'user', 'content': p}], template, tokenizer, add_generation_prompt=True)[0]
               for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    answers = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit='question', disable=not sys.stderr.isatty()) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            new = max(1, min(max_new_tokens, model.config.block_size - width))
            tokens = generate_batch(model, [encoded[i] for i in rows], new, pad, stop, temperature=0.0)
            for r, i in enumerate(rows):
                reply = tokens[r]
                cut = next((n for n, t in enumerate(reply) if t in (stop, tokenizer.eos_id)), len(reply))
                answers[i] = continuation_text(tokenizer, encoded[i], reply[:cut]).strip()
            bar.update(len(rows))
    return answers


def is_right(question, answer):
    return answer.strip() == question['chosen'].strip()


# -----------------------------------------------------------------------------
# scores

def score(questions, answers):
    """-> {'right', 'asked', 'accuracy', 'balanced_accuracy', 'per_answer': {right answer: (right, asked)},
    'constant': (the commonest right answer, its accuracy), 'constant_balanced': 1 / classes}."""
    per_answer = {}
    for q, a in zip(questions, answers, strict=True):
        gold = q['chosen'].strip()
        right, asked = per_answer.get(gold, (0, 0))
        per_answer[gold] = (right + is_right(q, a), asked + 1)
    asked = len(questions)
    right = sum(r for r, _ in per_answer.values())
    commonest = max(per_answer, key=lambda gold: per_answer[gold][1]) if per_answer else None
    return {'right': right, 'asked': asked, 'accuracy': right / asked if asked else 0.0,
            'balanced_accuracy': sum(r / n for r, n in per_answer.values()) / len(per_answer) if per_answer else 0.0,
            'per_answer': per_answer,
            'constant': (commonest, per_answer[commonest][1] / asked if asked else 0.0),
            'constant_balanced': 1 / len(per_answer) if per_answer else 0.0}


def mcnemar(before, after):
    """McNemar's exact test of two models' right/wrong on the same questions (lists of bools): -> (b, c, p) with
    b = right before and wrong after, c = wrong before and right after, p the two-sided exact binomial
    p-value of b against c (1.0 when they never differ)."""
    if len(before) != len(after):
        raise ValueError(f"a paired test needs the same questions: {len(before)} and {len(after)} answers")
    b = sum(x and not y for x, y in zip(before, after))
    c = sum(y and not x for x, y in zip(before, after))
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return b, c, min(1.0, 2 * tail)


def score_lines(name, s):
    lines = [f"{name}: {s['right']}/{s['asked']} = {s['accuracy']:.1%} exact, balanced accuracy "
             f"{s['balanced_accuracy']:.1%}   (constant answer {s['constant'][0]!r}: {s['constant'][1]:.1%} exact, "
             f"balanced {s['constant_balanced']:.1%})"]
    for gold, (r, n) in sorted(s['per_answer'].items()):
        lines.append(f"  right answer {gold!r}: {r}/{n} = {r / n:.1%}")
    return lines
