import pytest

from mirim.chat import chat_ids, CHAT_TEMPLATES, get_template, render_chat, stop_id
from mirim.tokenizer import load_tokenizer

CONVERSATION = [{'role': 'system', 'content': 'Seja breve.'}, {'role': 'user', 'content': 'Oi!'},
                {'role': 'assistant', 'content': 'Olá! Tudo bem?'}, {'role': 'user', 'content': 'Sim.'}]


@pytest.fixture(scope='module')
def tok():
    return load_tokenizer('bytes')


def test_chatml_renders_the_chatml_text():
    assert render_chat(CONVERSATION[1:3], 'chatml', add_generation_prompt=True) == (
        '<|im_start|>user\nOi!<|im_end|>\n<|im_start|>assistant\nOlá! Tudo bem?<|im_end|>\n'
        '<|im_start|>assistant\n')


def test_aira_renders_instruction_tokens_and_ends_replies_with_eos():
    # model card of TeenyTinyLlama-460m-Chat: <instruction>question</instruction>answer</s>, contents stripped
    assert render_chat(CONVERSATION[1:], 'aira') == '<instruction>Oi!</instruction>Olá! Tudo bem?</s><instruction>Sim.</instruction>'


def test_chat_ids_are_bos_then_the_whole_rendered_text_encoded_at_once(tok):
    ids, _ = chat_ids(CONVERSATION, 'chatml', tok, add_generation_prompt=True)
    assert ids == tok.encode(render_chat(CONVERSATION, 'chatml', add_generation_prompt=True), bos=True)


def test_mask_covers_exactly_the_replies_and_their_stop_marker(tok):
    ids, mask = chat_ids(CONVERSATION, 'chatml', tok)
    assert len(mask) == len(ids)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == 'Olá! Tudo bem?<|im_end|>'


def test_aira_reply_ends_with_the_eos_token_and_it_is_trained(tok):
    ids, mask = chat_ids(CONVERSATION[1:3], 'aira', tok)
    assert (ids[-1], mask[-1]) == (tok.eos_id, 1)
    assert stop_id('aira', tok) == tok.eos_id


def test_chatml_stop_is_the_im_end_token(tok):
    assert stop_id('chatml', tok) == tok.token_to_id('<|im_end|>')


def test_template_without_a_system_role_refuses_a_system_message(tok):
    with pytest.raises(ValueError, match='no .system. role'):
        chat_ids(CONVERSATION, 'aira', tok)


def test_unknown_template_name_lists_the_known_ones():
    with pytest.raises(ValueError, match='chatml'):
        get_template('vicuna')


def test_templates_are_plain_data_that_a_checkpoint_can_hold():
    allowed = (str, bool, type(None))
    assert all(isinstance(v, allowed) for t in CHAT_TEMPLATES.values() for v in t.values())


def old_chat_ids(messages, template, tokenizer, add_generation_prompt=False):
    """chat_ids as it was: every piece boundary found by encoding the whole prefix (quadratic)."""
    from mirim.chat import EOS, chat_pieces, common_prefix
    ids, mask, chunk = [tokenizer.bos_id], [0], []

    def flush():
        text = ''.join(t for t, _ in chunk)
        full = tokenizer.encode(text)
        done, end = 0, 0
        for n, (piece, trained) in enumerate(chunk):
            end += len(piece)
            upto = len(full) if n == len(chunk) - 1 else common_prefix(tokenizer.encode(text[:end]), full)
            ids.extend(full[done:upto])
            mask.extend([int(trained)] * (upto - done))
            done = max(done, upto)
        chunk.clear()

    for text, trained in chat_pieces(messages, template, add_generation_prompt):
        if text == EOS:
            flush()
            ids.append(tokenizer.eos_id)
            mask.append(int(trained))
        else:
            chunk.append((text, trained))
    flush()
    return ids, mask


def long_chat(n):
    roles = ['user', 'assistant']
    return [{'role': 'system', 'content': 'Seja breve.'}] + [
        {'role': roles[i % 2], 'content': f'mensagem {i}: olá <|im_end|> ' * (i % 3) + 'fim'} for i in range(n)]


@pytest.mark.parametrize('template', ['chatml', 'aira'])
def test_long_chat_ids_equal_the_old_prefix_by_prefix_way(tok, template):
    messages = long_chat(40) if template == 'chatml' else long_chat(40)[1:]
    for gen in (False, True):
        assert chat_ids(messages, template, tok, gen) == old_chat_ids(messages, template, tok, gen)


def test_a_chat_of_2000_messages_takes_well_under_a_second(tok):
    import time
    start = time.perf_counter()
    ids, mask = chat_ids(long_chat(2000), 'chatml', tok, add_generation_prompt=True)
    assert time.perf_counter() - start < 1.0
    assert len(ids) == len(mask) == len(tok.encode(render_chat(long_chat(2000), 'chatml', True))) + 1
