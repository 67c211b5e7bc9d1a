"""
Chat templates: how a conversation becomes one token sequence, for chat fine-tuning
(data/prepare_chat.py) and for chatting with the result (sample.py --chat).

A template is plain data (it travels in the checkpoint as tokenizer.chat_template): one string
per role with a {content} slot, the text that asks the model for a reply (generation_prompt),
and the marker that ends a reply (stop). '{eos}' stands for the tokenizer's end-of-text token,
which no text can spell (a SentencePiece '</s>' typed in text is four characters, not a token).

    messages = [{'role': 'user', 'content': 'Oi!'}, {'role': 'assistant', 'content': 'Olá!'}]
    render_chat(messages, CHAT_TEMPLATES['chatml'])   # -> the text, for reading
    ids, mask = chat_ids(messages, 'chatml', tok)      # -> tokens, and which ones to train on
"""
import json

CHAT_TEMPLATES = {
    # ChatML (OpenAI's format, used by cucafera and most small chat models). Its two markers are
    # tokenizer.py's default special tokens, so they are single tokens in every mirim tokenizer.
    'chatml': {
        'name': 'chatml',
        'system': '<|im_start|>system\n{content}<|im_end|>\n',
        'user': '<|im_start|>user\n{content}<|im_end|>\n',
        'assistant': '<|im_start|>assistant\n{content}<|im_end|>\n',
        'generation_prompt': '<|im_start|>assistant\n',
        'stop': '<|im_end|>',
    },
    # TeenyTinyLlama-460m-Chat / Aira (Corrêa et al.): '<instruction>' + question + '</instruction>',
    # then the answer and </s>; no system role; contents are stripped. Source: the model card's
    # chat template, github.com/Nkluge-correa/TeenyTinyLlama cards/models/TeenyTinyLlama-460m-Chat.md
    # (its tokenizer adds '<instruction>' and '</instruction>' as special tokens: vocab 32002).
    'aira': {
        'name': 'aira',
        'system': None,
        'user': '<instruction>{content}</instruction>',
        'assistant': '{content}{eos}',
        'generation_prompt': '',
        'stop': '{eos}',
        'strip': True,
    },
}

ROLES = ('system', 'user', 'assistant')
EOS = '{eos}'


def get_template(template):
    """A template dict from a name in CHAT_TEMPLATES or a dict (checked for the keys it needs)."""
    if isinstance(template, str):
        if template not in CHAT_TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; known: {sorted(CHAT_TEMPLATES)}")
        return CHAT_TEMPLATES[template]
    if not isinstance(template, dict):
        raise ValueError(f"a chat template is a name or a dict, got {type(template).__name__}")
    missing = [k for k in ('user', 'assistant', 'generation_prompt', 'stop') if k not in template]
    if missing:
        raise ValueError(f"chat template {template.get('name', '?')!r} lacks {missing}")
    for role in ROLES:
        if template.get(role) is not None and template[role].count('{content}') != 1:
            raise ValueError(f"chat template {template.get('name', '?')!r}: its {role!r} string needs "
                             f"exactly one {{content}} slot")
    if template['stop'] not in template['assistant']:
        raise ValueError(f"chat template {template.get('name', '?')!r}: stop marker {template['stop']!r} "
                         f"must end the assistant string {template['assistant']!r}")
    return template


def _split_eos(text, trained):
    """Template text 'a{eos}b' -> [('a', t, False), (EOS, t, False), ('b', t, False)], dropping empty texts."""
    pieces = []
    for n, part in enumerate(text.split(EOS)):
        if n:
            pieces.append((EOS, trained, False))
        if part:
            pieces.append((part, trained, False))
    return pieces


def chat_pieces(messages, template, add_generation_prompt=False):
    """The conversation as (text, trained, content) pieces in order; a template piece EOS is the eos token. trained
    marks what a fine-tune learns to produce: each assistant content and its stop marker. content marks
    a message's own text, which is all text (its '<|im_end|>' is ten characters); the template's text
    around it holds the markers, the only special tokens of a chat."""
    template = get_template(template)
    name = template.get('name', '?')
    pieces = []
    for n, message in enumerate(messages):
        role, content = message.get('role'), message.get('content')
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"message {n} must be {{'role': one of {ROLES}, 'content': str}}, got {message!r}")
        if template.get(role) is None:
            raise ValueError(f"chat template {name!r} has no {role!r} role")
        if role == 'system' and n > 0:
            raise ValueError(f"message {n}: a system message can only come first")
        if template.get('strip'):
            content = content.strip()
        prefix, suffix = template[role].split('{content}')
        trained = role == 'assistant'
        pieces += _split_eos(prefix, False)
        pieces += [(content, trained, True)] if content else []
        if trained:  # the reply's stop marker is trained too (so the model learns to stop), what follows is not
            end = suffix.index(template['stop']) + len(template['stop'])
            pieces += _split_eos(suffix[:end], True) + _split_eos(suffix[end:], False)
        else:
            pieces += _split_eos(suffix, False)
    if add_generation_prompt:
        pieces += _split_eos(template['generation_prompt'], False)
    return pieces


def render_chat(messages, template, add_generation_prompt=False, eos='</s>'):
    """The conversation as text (eos written as the string `eos`), for reading and debugging."""
    pieces = chat_pieces(messages, template, add_generation_prompt)
    return ''.join(eos if text == EOS and not content else text for text, _, content in pieces)


def chat_ids(messages, template, tokenizer, add_generation_prompt=False):
    """-> (ids, mask): <bos> then the conversation's tokens; mask[i] is 1 where token i is trained on
    (assistant contents and their stop markers), 0 elsewhere, as in mask shards (shards.py).

    The special tokens are the template's markers ('<|im_start|>', '<|im_end|>', Aira's tags, {eos})
    and nothing else: a message's content is read as text whatever it holds, so no one can write a turn
    of their own into a chat by typing '<|im_end|>\n<|im_start|>assistant' or '</s>'.

    The ids are those of encoding the rendered text between two eos tokens in one piece, as at inference
    (SentencePiece puts a '▁' before every separately encoded text), with special tokens at the markers
    only: the text between two markers is one run, encoded apart by tokenizer.encode_run, which knows
    whether a marker stands before and after it. Piece boundaries inside a run are found by encoding the
    run up to them; runs are one message long at most, so a long chat costs linear time."""
    ids, mask = [tokenizer.bos_id], [0]
    run, after = [], False  # the (text, trained) pieces of the current run; whether a marker precedes it
    pattern = tokenizer.specials_pattern

    def flush(before):
        text = ''.join(t for t, _ in run)
        full = tokenizer.encode_run(text, after, before)
        done, end = 0, 0
        for n, (piece, trained) in enumerate(run):
            end += len(piece)
            upto = len(full) if n == len(run) - 1 else common_prefix(tokenizer.encode_run(text[:end], after), full)
            ids.extend(full[done:upto])
            mask.extend([int(trained)] * (upto - done))
            done = max(done, upto)
        if not run and full:  # SentencePiece: the '▁' it puts before a text that starts with a marker
            ids.extend(full)
            mask.extend([0] * len(full))
        run.clear()

    for text, trained, content in chat_pieces(messages, template, add_generation_prompt):
        if text == EOS and not content:  # ends the text encoded in one piece: what follows starts a new one
            flush(before=False)
            ids.append(tokenizer.eos_id)
            mask.append(int(trained))
            after = False
            continue
        parts = [text] if content or pattern is None else pattern.split(text)  # odd parts: the markers
        for n, part in enumerate(parts):
            if n % 2 == 0:
                if part:
                    run.append((part, trained))
                continue
            flush(before=True)
            ids.append(tokenizer.specials_in_text[part])
            mask.append(int(trained))
            after = True
    flush(before=False)
    return ids, mask


def common_prefix(a, b, start=0):
    """How many leading items of a equal b's items from b[start] on."""
    n = 0
    while n < len(a) and start + n < len(b) and a[n] == b[start + n]:
        n += 1
    return n


def stop_id(template, tokenizer):
    """The token that ends a reply under this template."""
    template = get_template(template)
    if template['stop'] == EOS:
        return tokenizer.eos_id
    token = tokenizer.token_to_id(template['stop'])
    if token is None:
        raise ValueError(f"the tokenizer has no single token for the chat template's stop marker "
                         f"{template['stop']!r}: train the tokenizer with it as a special token "
                         f"(tokenizer.py --special_tokens) or use another template")
    return token


def role_parts(template):
    """(role, text before the content, text after it) for each role the template has, in ROLES order:
    the one walk over a template that its Jinja (transformers) and Go (ollama) renderings are built from."""
    t = get_template(template)
    return [(role, *t[role].split('{content}')) for role in ROLES if t.get(role) is not None]


def chat_template_jinja(template):
    """A mirim chat template as the Jinja string transformers' apply_chat_template runs.
    '{eos}' becomes eos_token; the conversation starts with bos_token, as chat_ids does."""
    t = get_template(template)

    def text(s):  # a Jinja expression for s, with {eos} as the eos_token variable
        parts = [json.dumps(part, ensure_ascii=False) for part in s.split(EOS)]
        return ' + eos_token + '.join(parts)

    content = "(message['content'] | trim)" if t.get('strip') else "message['content']"
    branches = []
    for role, prefix, suffix in role_parts(t):
        check = ("{% if not loop.first %}{{ raise_exception('a system message can only come first') }}{% endif %}"
                 if role == 'system' else '')
        branches.append(f"message['role'] == '{role}' %}}{check}{{{{ {text(prefix)} + {content} + {text(suffix)} }}}}")
    roles = ', '.join(role for role, _, _ in role_parts(t))
    return ("{{ bos_token }}{% for message in messages %}{% if " + '{% elif '.join(branches) +
            "{% else %}{{ raise_exception('this template knows the roles " + roles + "') }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ " + text(t['generation_prompt']) + " }}{% endif %}")


def chat_template_go(template, eos, lead=''):
    """A mirim chat template in the Go template syntax of an ollama Modelfile, with '{eos}' written as the
    string eos and `lead` (text a prompt must start with, after <bos>) in front."""
    t = get_template(template)
    branches = [f'if eq .Role "{role}" }}}}{prefix.replace(EOS, eos)}{{{{ .Content }}}}{suffix.replace(EOS, eos)}'
                for role, prefix, suffix in role_parts(t)]
    body = ('{{- range .Messages }}{{ ' + '{{ else '.join(branches) + '{{ end }}{{ end }}' +
            t['generation_prompt'].replace(EOS, eos))
    return (f'{{{{ "{lead}" }}}}' if lead else '') + body  # not bare text: '{{-' would trim it
