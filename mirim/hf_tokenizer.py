"""
A mirim tokenizer as Hugging Face tokenizer files (tokenizer.json built with the `tokenizers` library,
which transformers uses, tokenizer_config.json, special_tokens_map.json): a SentencePiece model becomes a
tokenizer.json that reproduces SentencePiece's ids (checked on sample texts at export time);
'bytes' and tiktoken tokenizers become byte-level BPE tokenizer.json files with the same ids; a tokenizer
that came as a tokenizer.json is written back unchanged. export.py and gguf_export.py use it.
"""
import os
import unicodedata

from mirim.atomic import write_atomic, write_json
from mirim.chat import chat_template_jinja

SPACE = '\u2581'  # '▁', SentencePiece's visible space


def sentencepiece_backend(tok):
    """A `tokenizers.Tokenizer` that gives SentencePiece's ids. SentencePiece puts a '▁' before
    the text (add_dummy_prefix), then finds its user-defined pieces (chat tokens) in it; so text
    that starts with '<|im_start|>' encodes as ['▁', '<|im_start|>', ...]. Hugging Face's own Llama
    conversion (Metaspace) drops that '▁' and also the '▁' of a leading space; here the prefix is
    a normalizer instead, and the chat tokens are matched after normalization, which reproduces
    SentencePiece. The one text it cannot tell apart: a lone chat token (SentencePiece: '▁' first)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, models, normalizers, processors
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.to_dict()['model_proto'])
    spec, norm, Piece = proto.trainer_spec, proto.normalizer_spec, proto.SentencePiece
    if spec.treat_whitespace_as_suffix:
        raise ValueError("cannot export a SentencePiece model with treat_whitespace_as_suffix")
    pieces = list(proto.pieces)
    unk = pieces[spec.unk_id].piece
    if spec.model_type == spec.BPE:
        # SentencePiece BPE merges the adjacent pair whose joined piece scores highest: as ranked
        # merges, every way to split a piece into two pieces, ordered by the piece's score
        normal = {p.piece: i for i, p in enumerate(pieces) if p.type == Piece.NORMAL}
        merges = []
        for piece, i in sorted(normal.items(), key=lambda item: (-pieces[item[1]].score, item[1])):
            splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                      if piece[:k] in normal and piece[k:] in normal]
            merges += sorted(splits, key=lambda pair: (normal[pair[0]], normal[pair[1]]))
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback)
    elif spec.model_type == spec.UNIGRAM:
        # only normal pieces may be chosen by the Viterbi search; the others are reached otherwise
        floor = min(p.score for p in pieces) - 100.0
        vocab = [(p.piece, p.score if p.type == Piece.NORMAL else floor) for p in pieces]
        model = models.Unigram(vocab, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    else:
        raise ValueError(f"cannot export a SentencePiece model of type {spec.model_type} (only bpe and unigram)")
    backend = Backend(model)

    user_defined = [p.piece for p in pieces if p.type == Piece.USER_DEFINED]
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r'\A +| +\z'), ''), normalizers.Replace(Regex(' {2,}'), ' ')]
    if norm.add_dummy_prefix:
        # '▁' at the start of the text, but not at the start of a chat token's own text (the
        # normalizer also runs on it): \A, unless the whole string is exactly one chat token
        lone = '|'.join(regex_escape(p) for p in user_defined)
        steps.append(normalizers.Replace(Regex(rf'\A(?!(?:{lone})\z)' if lone else r'\A'), SPACE))
    steps.append(normalizers.Replace(' ', SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    # SentencePiece's decode takes off the '▁' it put before a text; here that happens after <s>
    # only, where a text starts. Ids without <s> decode to the text they add, leading space and all:
    # transformers 5's text-generation pipeline decodes the new tokens alone and appends them to the
    # prompt. So <s> is an added token but not a special one, which skip_special_tokens would drop
    # before the decoder sees it.
    strip_after = pieces[tok.bos_id].piece if norm.add_dummy_prefix and tok.bos_id is not None else None
    added = [AddedToken(p.piece, special=True, normalized=p.type == Piece.USER_DEFINED)
             for p in pieces if p.type in (Piece.CONTROL, Piece.UNKNOWN, Piece.USER_DEFINED)]
    backend.add_special_tokens([t for t in added if t.content != strip_after])
    backend.add_tokens([AddedToken(strip_after, special=False, normalized=False)] if strip_after else [])
    decode = [decoders.Replace(SPACE, ' '), decoders.ByteFallback(), decoders.Fuse()]
    if strip_after:  # as SentencePiece: one space off after the first <s>, every <s> decodes to nothing ...
        bos = regex_escape(strip_after)
        # ... but for <s> alone, which decodes to '<s>', as in other tokenizers: lm-evaluation-harness takes
        # decode([bos]) for the text a prompt starts with when it holds its <s> already, and '' would say
        # that of every prompt (it then adds no <s>, and scores what the model never saw in training)
        decode += [decoders.Replace(Regex(rf'\A{bos} '), ''), decoders.Replace(Regex(rf'(?!\A{bos}\z){bos}'), '')]
    elif norm.add_dummy_prefix:  # no <s> to tell where a text starts: every decode is taken as one
        decode.append(decoders.Strip(' ', 1, 0))
    backend.decoder = decoders.Sequence(decode)
    if tok.bos_id is not None:
        bos = pieces[tok.bos_id].piece
        backend.post_processor = processors.TemplateProcessing(
            single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, tok.bos_id)])
    return backend


def regex_escape(text):
    return ''.join('\\' + ch if ch in '\\^$.|?*+()[]{}' else ch for ch in text)


def bytes_to_unicode():
    """GPT-2's table of 256 printable characters standing for the 256 byte values: printable
    Latin-1 bytes stand for themselves, the others for characters from U+0100 on. Byte-level
    tokenizers in transformers spell byte tokens this way."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_backend(tok):
    """mirim's 'bytes' tokenizer (ids 0-255 are the bytes) or a tiktoken one, as a byte-level BPE:
    tiktoken merges the adjacent pair whose joined token has the lowest rank, which is ranked
    merges ordered by the joined token's rank. The text is first split with tiktoken's pattern."""
    from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, models, pre_tokenizers, processors
    if tok.kind == 'tiktoken':
        ranks, pattern = tok._enc._mergeable_ranks, tok._enc._pat_str
    else:
        ranks, pattern = {bytes([b]): b for b in range(256)}, None
    table = bytes_to_unicode()
    spell = lambda token: ''.join(table[b] for b in token)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        merges += [(spell(a), spell(b)) for a, b in sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))]
    backend = Backend(models.BPE(vocab={spell(t): r for t, r in ranks.items()}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.pre_tokenizer = byte_level if pattern is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior='isolated'), byte_level])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                for p, i in sorted(tok.special_tokens.items(), key=lambda item: item[1])])
    bos = next(p for p, i in tok.special_tokens.items() if i == tok.bos_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, tok.bos_id)])
    return backend


def tokenizer_backend(tok):
    """The mirim tokenizer as a `tokenizers.Tokenizer` (what tokenizer.json serializes)."""
    backend = sentencepiece_backend(tok) if tok.kind == 'sentencepiece' else byte_level_backend(tok)
    for piece, i in tok.special_tokens.items():
        if backend.token_to_id(piece) != i:
            raise ValueError(f"tokenizer.json would give {piece!r} id {backend.token_to_id(piece)}, not {i}")
    return backend


PARITY_TEXTS = [
    'No princípio criou Deus os céus e a terra.', 'Ação, coração, pão e maçã: 1948, R$ 3,50 (20%).',
    'आदि में परमेश्‍वर ने आकाश और पृथ्वी की सृष्टि की।', 'আদিতে ঈশ্বর আকাশমণ্ডল ও পৃথিবী সৃষ্টি করিলেন। ইসহাকের পুত্র যাকোব',
    'Hapo mwanzo Mungu aliziumba mbingu na nchi.', '起初，神创造天地。', 'Emoji 🙂👋🏽🇧🇷 ok 😀!',
    ' leading space', '  two leading', 'trailing  ', '   ', 'tab\there\nnew line\n\nend', '\nstarts with newline',
]


def check_tokenizer_ids(tok, backend, texts=()):
    """SentencePiece and the exported tokenizer.json must give the same ids; raises on the first difference."""
    specials = [p for p, i in tok.special_tokens.items() if i not in (tok.bos_id, tok.eos_id, tok.pad_id, tok._unk_id)]
    samples = list(PARITY_TEXTS) + list(texts)
    samples += [unicodedata.normalize('NFD', text) for text in samples]  # decomposed letters: normalizers differ there
    for special in specials:
        samples += [f'{special}user\nOlá {special}', f'a{special} b', f' {special}\n{special}{special}x']
    if tok.kind == 'sentencepiece':  # every piece of the vocab, in runs of 50
        spelled = [tok.decode([i]) for i in range(tok.vocab_size) if i not in tok.special_tokens.values()]
        samples += [' '.join(spelled[k:k + 50]) for k in range(0, len(spelled), 50)]
    for text in samples:
        expected, got = tok.encode(text), backend.encode(text, add_special_tokens=False).ids
        if got != expected:
            at = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise ValueError(f"the exported tokenizer.json disagrees with the mirim tokenizer on {text[:60]!r}: "
                             f"from token {at} it gives {got[at:at + 8]}, mirim {expected[at:at + 8]}. Please "
                             f"report this; --check_tokenizer=False exports anyway")


def write_tokenizer(tok, dest, model_max_length, check=True, append_eos=False):
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (and tokenizer.model for
    SentencePiece, which llama.cpp's converter and mirim's load_hf read). A tokenizer that came as a
    tokenizer.json (the 'tokenizers' kind) is written back byte for byte: it is its own reference.
    append_eos: encode as classify.py does, <bos> text <eos> (and <bos> pair <eos> after it)."""
    if tok.kind == 'tokenizers':
        tokenizer_json = tok.to_dict()['tokenizer_json']
        backend = tok._backend
    else:
        backend = tokenizer_backend(tok)
        if check:
            check_tokenizer_ids(tok, backend)
        tokenizer_json = None
    if append_eos:
        from tokenizers import Tokenizer as Backend, processors
        backend = Backend.from_str(backend.to_str())  # a copy: the tokenizer's own stays as it is
        bos, eos = backend.id_to_token(tok.bos_id), backend.id_to_token(tok.eos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f'{bos} $A {eos}', pair=f'{bos} $A {eos} {bos} $B {eos}',
            special_tokens=[(bos, tok.bos_id), (eos, tok.eos_id)])
        tokenizer_json = None
    if tokenizer_json is None:
        tokenizer_json = backend.to_str(pretty=True).encode('utf-8')
    names = {i: p for p, i in tok.special_tokens.items()}
    if tok.kind == 'tokenizers':  # its bos/eos/pad/unk may be ordinary vocab entries
        names.update({i: tok._backend.id_to_token(i) for i in (tok.bos_id, tok.eos_id, tok.pad_id, tok._unk_id)
                      if i is not None and i not in names})
    specials = {'bos_token': names.get(tok.bos_id), 'eos_token': names.get(tok.eos_id),
                'unk_token': names.get(tok._unk_id), 'pad_token': names.get(tok.pad_id)}
    specials = {k: v for k, v in specials.items() if v is not None}
    extra = [p for i, p in sorted(names.items()) if p not in specials.values()]
    config = {
        # the generic fast tokenizer loads tokenizer.json as it is; transformers 5's LlamaTokenizer
        # would rebuild it with its own pre-tokenizer and change the ids (see sentencepiece_backend)
        'tokenizer_class': 'PreTrainedTokenizerFast',
        **specials, 'additional_special_tokens': extra,
        # said explicitly, transformers sets the post-processor to '<bos> $A' whatever tokenizer.json has
        'add_bos_token': tok.bos_id is not None, 'add_eos_token': append_eos,
        'clean_up_tokenization_spaces': False, 'model_max_length': model_max_length,
        # the special tokens by id, as transformers writes them: converters (llama.cpp's) and other
        # tools read this to treat the chat markers as control tokens, not text. A SentencePiece <s>
        # that tokenizer.json keeps unspecial (see sentencepiece_backend) is left out: transformers
        # would make a listed one special again, and llama.cpp's converter read an unspecial one as text
        'added_tokens_decoder': {str(i): {key: getattr(token, key) for key in
                                          ('content', 'lstrip', 'normalized', 'rstrip', 'single_word', 'special')}
                                 for i, token in sorted(backend.get_added_tokens_decoder().items())
                                 if token.special or i != tok.bos_id},
    }
    if tok.chat_template:
        config['chat_template'] = chat_template_jinja(tok.chat_template)
    os.makedirs(dest, exist_ok=True)
    write_atomic(os.path.join(dest, 'tokenizer.json'), tokenizer_json)
    write_json(os.path.join(dest, 'tokenizer_config.json'), config)
    write_json(os.path.join(dest, 'special_tokens_map.json'), {**specials, 'additional_special_tokens': extra})
    if tok.kind == 'sentencepiece':
        write_atomic(os.path.join(dest, 'tokenizer.model'), tok.to_dict()['model_proto'])
