"""
One tokenizer interface over SentencePiece, tiktoken, Hugging Face tokenizer.json files (the
`tokenizers` library) and raw UTF-8 bytes, and the training of new ones (tokenizer.py is the command).

    tok = load_tokenizer('data/biblia/pt/tokenizer.model')  # or 'bytes', 'tiktoken:gpt2',
    ids = tok.encode('Olá, mundo!', bos=True, eos=True)     # 'x/tokenizer.json', an HF model folder
    text = tok.decode(ids)
"""

import base64
import glob
import io
import json
import os
import re
import sys

from mirim.atomic import write_atomic

DEFAULT_SPECIAL_TOKENS = ('<|im_start|>', '<|im_end|>')  # ChatML, for chat fine-tuning
SENTINELS = ('\uffff', '\ufffe')  # noncharacters: one stands for a special token around a stretch of text (encode_run)
KINDS = ('sentencepiece', 'tiktoken', 'tokenizers', 'bytes')
# kind -> (the field of to_dict() that holds its bytes, the file that holds them in a data folder or an
# out_dir); 'bytes' needs no file. SentencePiece's trainer also writes a readable vocab beside its model.
TOKENIZER_FILES = {'sentencepiece': ('model_proto', 'tokenizer.model'), 'tiktoken': ('ranks', 'tokenizer.tiktoken'),
                   'tokenizers': ('tokenizer_json', 'tokenizer.json')}
SENTENCEPIECE_VOCAB_FILE = 'tokenizer.vocab'  # beside tokenizer.model, for people to read; nothing loads it

# Split pattern for a tiktoken ranks file (GPT-2-era files get tiktoken's r50k pattern): cl100k_base's
# (tiktoken_ext/openai_public.py). It separates letters (any script), 1-3 digit groups, punctuation
# and whitespace runs. o200k_base.tiktoken has its own pattern: pass it as pat_str in a dict spec.
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
                  r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
SPEC_HELP = ("a tokenizer spec is 'bytes', 'tiktoken:NAME' (e.g. tiktoken:gpt2), "
             "'tiktoken:/path/to/ranks.tiktoken', a SentencePiece .model file, a Hugging Face tokenizer.json "
             "file or model folder, or a dict from to_dict()")
# a tokenizer.json alone does not say which of its special tokens starts and ends a document (the
# folder's tokenizer_config.json does): these names are taken, in this order, when nothing says so
BOS_NAMES = ('<s>', '<|begin_of_text|>', '<bos>', '<|startoftext|>', '<|endoftext|>')
EOS_NAMES = ('</s>', '<|end_of_text|>', '<eos>', '<|endoftext|>')
PAD_NAMES = ('<pad>', '<|pad|>', '<|finetune_right_pad_id|>')


def valid_text(text):
    """text, if it is a str that UTF-8 can hold; else ValueError saying what is wrong. Every encode goes
    through here, so text that is no text (a lone surrogate from a JSON escape such as "\\ud800", a
    command-line argument in another encoding) is one clear error, not a crash inside a tokenizer library."""
    if not isinstance(text, str):
        raise ValueError(f"expected text, got {type(text).__name__}")
    try:
        text.encode('utf-8')
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds {text[e.start]!a} at character {e.start}, a lone surrogate: not valid "
                         f"Unicode (a broken \\u escape, or bytes of another encoding)") from None
    return text


class Tokenizer:
    """encode/decode text for one of four kinds. Build one with load_tokenizer(spec).

    special_tokens maps every special piece to its id. Only the ones that are not bos/eos/pad/unk
    (the chat tokens, by default) are recognised inside text by encode(): '<|im_start|>' in a
    string becomes one id, while '<s>' in a string is just text. The 'tokenizers' kind does what its
    tokenizer.json says, as transformers does: every added token is found in text.
    """

    def __init__(self, description):
        self._description = dict(description)
        self.kind = description['kind']
        self.chat_template = description.get('chat_template')
        self.pad_id = None
        if self.kind == 'sentencepiece':
            self._init_sentencepiece(description)
        elif self.kind == 'tiktoken':
            self._init_tiktoken(description)
        elif self.kind == 'tokenizers':
            self._init_tokenizers(description)
        elif self.kind == 'bytes':
            self._init_bytes(description)
        else:
            raise ValueError(f"unknown tokenizer kind {self.kind!r}; expected one of {KINDS}")
        control = {self.bos_id, self.eos_id, self.pad_id, self._unk_id}
        self._text_specials = {p: i for p, i in self.special_tokens.items() if i not in control}
        # the special tokens that encode() finds written in text, and one pattern for them (longest first,
        # built once): SentencePiece finds its user-defined pieces, tokenizer.json files every special token
        # they list (bos and eos too), bytes and tiktoken the chat tokens
        self.specials_in_text = self._text_specials if self.kind in ('bytes', 'tiktoken') else self._in_text
        self.specials_pattern = (re.compile('(' + '|'.join(re.escape(p) for p in sorted(
            self.specials_in_text, key=len, reverse=True)) + ')') if self.specials_in_text else None)
        self._plain_models = {}  # encode(specials=False) and encode_run build these on first use
        expected = description.get('vocab_size')
        if expected is not None and expected != self.vocab_size:
            raise ValueError(f"tokenizer mismatch: expected vocab_size {expected} but "
                             f"{self._source()} has {self.vocab_size}")

    def _init_sentencepiece(self, d):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2  # protobuf: finds the user-defined pieces
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=d['model_proto'])
        except RuntimeError:  # protobuf's "INTERNAL: ... ParseFromArray" says nothing about which file
            where = d.get('path') or 'model_proto'
            raise ValueError(f"{where} is not a SentencePiece model file: {SPEC_HELP}") from None
        self.vocab_size = self._sp.vocab_size()
        self.bos_id, self.eos_id, self._unk_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(d['model_proto'])
        kinds = (proto.SentencePiece.UNKNOWN, proto.SentencePiece.CONTROL, proto.SentencePiece.USER_DEFINED)
        self.special_tokens = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in kinds}
        self._in_text = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == proto.SentencePiece.USER_DEFINED}

    def _init_tiktoken(self, d):
        import tiktoken
        from tiktoken_ext.openai_public import r50k_pat_str
        if d.get('ranks') is not None:  # a ranks file: its bytes travel with the description
            ranks = parse_tiktoken_ranks(d['ranks'], d.get('path') or 'ranks')
            gpt2_era = os.path.basename(d.get('path') or '').split('.')[0] in ('gpt2', 'r50k_base', 'p50k_base')
            pattern = d.get('pat_str') or (r50k_pat_str if gpt2_era else CL100K_PATTERN)
            self._description['pat_str'] = pattern
            base_specials = {'<|endoftext|>': max(ranks.values()) + 1}
        else:
            base = load_tiktoken_by_name(d['name'])
            ranks, pattern, base_specials = base._mergeable_ranks, base._pat_str, base._special_tokens
        specials = dict(base_specials)
        for piece, i in d.get('special_tokens', {}).items():
            specials.setdefault(piece, i)
        for piece in d.get('extra_special_tokens', ()):  # first load: append after the vocab
            specials.setdefault(piece, max(max(ranks.values()), *specials.values()) + 1)
        # tiktoken's own recipe for extending an encoding with special tokens (see its README)
        self._enc = tiktoken.Encoding(d.get('name') or os.path.basename(d.get('path') or 'ranks'),
                                      pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        self._description['extra_special_tokens'] = []  # now part of special_tokens
        self.vocab_size = self._enc.n_vocab
        self.special_tokens = specials
        self.bos_id = self.eos_id = specials['<|endoftext|>']  # GPT convention: one document separator
        self._unk_id = None

    def _init_tokenizers(self, d):
        from tokenizers import Tokenizer as Backend
        text = d['tokenizer_json']
        try:
            self._backend = Backend.from_str(text.decode('utf-8'))
        except Exception as e:  # tokenizers raises a bare Exception with serde's message
            where = d.get('path') or 'tokenizer_json'
            raise ValueError(f"{where} is not a tokenizer.json the `tokenizers` library can read "
                             f"({str(e).strip()[:200]})") from None
        vocab = self._backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        added = self._backend.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        model = json.loads(text).get('model') or {}
        self._unk_id = vocab.get(model.get('unk_token')) if model.get('unk_token') else (
            model.get('unk_id') if model.get('type') == 'Unigram' else None)
        # bos/eos/pad: as given (tokenizer_config.json's, read by load_hf_folder), else guessed by name
        for role, names in (('bos', (template_bos(text),) + BOS_NAMES), ('eos', EOS_NAMES), ('pad', PAD_NAMES)):
            piece = d.get(f'{role}_token')
            if piece is None:
                piece = next((n for n in names if n in self.special_tokens), None)
            if piece is not None and piece not in vocab:
                raise ValueError(f"{self._source()}: its {role} token {piece!r} is not in the tokenizer")
            self._description[f'{role}_token'] = piece
            setattr(self, f'{role}_id', None if piece is None else vocab[piece])
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"{self._source()} names no token to start or end a document (mirim writes <bos> "
                             f"text <eos>): put its tokenizer_config.json (bos_token, eos_token) beside it")
        # found in text: every special token and the document markers (export.py's tokenizer.json keeps
        # <s> an added token that is not special)
        control = (self.bos_id, self.eos_id, self.pad_id, self._unk_id)
        self._in_text = {t.content: i for i, t in sorted(added.items()) if t.special or i in control}
        self._normalized_specials = any(t.normalized for i, t in added.items() if t.special and i not in control)

    def _init_bytes(self, d):
        given = d.get('special_tokens') or ['<s>', '</s>', '<pad>', *DEFAULT_SPECIAL_TOKENS]
        names = sorted(given, key=given.get) if isinstance(given, dict) else list(given)
        self.special_tokens = {piece: 256 + i for i, piece in enumerate(names)}
        if names[:3] != ['<s>', '</s>', '<pad>'] or (isinstance(given, dict) and given != self.special_tokens):
            raise ValueError(f"bytes tokenizer special tokens must be <s>, </s>, <pad>, then any others, "
                             f"with ids 256, 257, ...; got {given}")
        self.vocab_size = 256 + len(names)
        self.bos_id, self.eos_id, self.pad_id, self._unk_id = 256, 257, 258, None
        self._id_to_special = {i: p for p, i in self.special_tokens.items()}

    # ---------------------------------------------------------------------------------------
    def encode(self, text, bos=False, eos=False, specials=True):
        """text -> ids. specials=True finds the special tokens written in the text (specials_in_text:
        '<|im_end|>' becomes its one id), as a plain text prompt or a training document wants; specials=False
        reads every character as text, as a chat message's content wants (chat.chat_ids): nobody can
        write a control token there."""
        valid_text(text)
        if not specials:
            ids = self._encode_plain([text])[0]
        elif self.kind == 'sentencepiece':
            ids = self._sp.encode(text)
        elif self.kind == 'tiktoken':
            ids = self._enc.encode(text, allowed_special=set(self._text_specials), disallowed_special=())
        elif self.kind == 'tokenizers':
            ids = self._backend.encode(text, add_special_tokens=False).ids
        else:
            ids = self._encode_bytes(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts, bos=False, eos=False, specials=True):
        texts = [valid_text(text) for text in texts]
        if not specials:
            batch = self._encode_plain(texts)
        elif self.kind == 'sentencepiece':  # both libraries spread a batch over threads themselves
            batch = self._sp.encode(texts, num_threads=os.cpu_count())
        elif self.kind == 'tiktoken':
            batch = self._enc.encode_batch(texts, allowed_special=set(self._text_specials),
                                           disallowed_special=())
        elif self.kind == 'tokenizers':
            batch = [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        else:
            batch = [self._encode_bytes(t) for t in texts]
        if bos or eos:
            batch = [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in batch]
        return batch

    def encode_run(self, text, after_special=False, before_special=False):
        """The ids of a stretch of a longer text that has special tokens only where the caller puts them
        (chat.chat_ids: the chat template's markers): text holds none (every character is text), and
        after_special / before_special say whether a special token stands right before / after it, else it
        starts / ends the text. The ids are exactly those that encode() gives this stretch of the whole text
        when it holds no other special token. That is the text encoded on its own for bytes and tiktoken;
        SentencePiece and tokenizer.json files also look at where it stands (SentencePiece's '▁' before the
        first word, Metaspace's prepend_scheme 'first'), so there a noncharacter that is a special token of
        a copy of the tokenizer stands in for each special token around the text, and the ids between
        them are taken: U+FFFF, or U+FFFE where the text holds U+FFFF (text holding both: ValueError)."""
        valid_text(text)
        if self.kind in ('bytes', 'tiktoken'):
            return self._encode_plain([text])[0]
        sentinel = next((c for c in SENTINELS if c not in text), None)
        if sentinel is None:
            raise ValueError(f"the text holds both U+FFFF and U+FFFE, Unicode noncharacters, one of which the "
                             f"{self.kind} tokenizer needs for encoding chats")
        model, sentinel_id = self._plain_model(sentinel)
        if self.kind == 'tokenizers' and self._normalized_specials:
            # chat tokens matched after normalization (export.py's SentencePiece tokenizer.json): the sentinel,
            # normalized as they are, is found at the start of a text only, and what goes before a chat token
            # that starts a text ('▁') is what the tokenizer puts before the first of two
            if not text and not after_special:
                return self._before_first_special() if before_special else []
            before_special = False
        whole = sentinel * after_special + text + sentinel * before_special
        ids = (model.encode(whole) if self.kind == 'sentencepiece'
               else model.encode(whole, add_special_tokens=False).ids)
        if after_special:  # what comes before the sentinel is the text's start ('▁'), not this stretch's
            ids = ids[ids.index(sentinel_id) + 1:]
        if before_special:
            ids = ids[:len(ids) - 1 - ids[::-1].index(sentinel_id)]
        return ids

    def _before_first_special(self):
        marker = next(iter(self._text_specials or self.specials_in_text))
        ids = self._backend.encode(marker * 2, add_special_tokens=False).ids
        return ids[:ids.index(self.specials_in_text[marker])]

    def _encode_plain(self, texts):
        """texts -> ids with no special token found in them (encode(specials=False))."""
        if self.kind == 'bytes':
            return [list(text.encode('utf-8')) for text in texts]
        if self.kind == 'tiktoken':
            return [self._enc.encode_ordinary(text) for text in texts]
        model, _ = self._plain_model(None)
        if self.kind == 'sentencepiece':
            return model.encode(texts)
        return [e.ids for e in model.encode_batch(texts, add_special_tokens=False)]

    def _plain_model(self, sentinel):
        """(a copy of the SentencePiece model or tokenizer.json backend that finds no special token in text,
        the id of its one special token `sentinel` if one is given, else None), built once. SentencePiece: the
        user-defined pieces become unused ones, which its encoder never produces; tokenizer.json:
        encode_special_tokens, which reads the special tokens' text as text (its added tokens that are
        not special stay words of the vocabulary). The sentinel goes in as the chat tokens do."""
        if sentinel in self._plain_models:
            return self._plain_models[sentinel]
        if self.kind == 'sentencepiece':
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self._description['model_proto'])
            for i in self._in_text.values():
                proto.pieces[i].type = proto.SentencePiece.UNUSED
            if sentinel:
                proto.pieces.add(piece=sentinel, score=0.0, type=proto.SentencePiece.USER_DEFINED)
            model = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
            found = (model, model.piece_to_id(sentinel) if sentinel else None)
        else:
            from tokenizers import AddedToken, Tokenizer as Backend
            spec = json.loads(self._description['tokenizer_json'])
            if (spec.get('model') or {}).get('type') == 'Unigram':
                # its Viterbi search still finds a special token's piece in the text (one piece scores better
                # than a run of unknown characters): renamed to text that normalized input never holds (a
                # space: these models see '▁'), the piece keeps its id and score and is never found
                for i in self._in_text.values():
                    spec['model']['vocab'][i][0] = ' ' + SENTINELS[0] + spec['model']['vocab'][i][0]
            model = Backend.from_str(json.dumps(spec))
            unspecial = [t for t in self._backend.get_added_tokens_decoder().values()
                         if t.content in self.specials_in_text and not t.special]  # export.py's <s>
            model.add_special_tokens([AddedToken(t.content, special=True, normalized=t.normalized) for t in unspecial])
            model.encode_special_tokens = True
            if sentinel:
                model.add_tokens([AddedToken(sentinel, special=False, normalized=self._normalized_specials)])
            found = (model, model.token_to_id(sentinel) if sentinel else None)
        self._plain_models[sentinel] = found
        return found

    def decode(self, ids):
        ids = [int(i) for i in ids]  # accepts numpy arrays and tensors too
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside this tokenizer's vocab (size {self.vocab_size})")
        if self.kind == 'sentencepiece':
            return self._sp.decode(ids)
        if self.kind == 'tiktoken':  # like SentencePiece's <s>, </s>: the document markers are not text
            return self._enc.decode([i for i in ids if i not in (self.bos_id, self.eos_id)], errors='replace')
        if self.kind == 'tokenizers':  # document markers and padding are not text; chat tokens are
            # a marker the decoder itself turns into nothing stays in: export.py's SentencePiece
            # tokenizer.json takes a text's leading space off after its <s> (and keeps a lone <s>, for
            # lm-evaluation-harness: hence two in a row, which it turns into nothing)
            markers = [i for i in (self.bos_id, self.eos_id, self.pad_id)
                       if self._backend.decode([i, i], skip_special_tokens=False)]
            return self._backend.decode([i for i in ids if i not in markers], skip_special_tokens=False)
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode('utf-8', errors='replace'))
            run = bytearray()
            if i in self._text_specials.values():  # bos/eos/pad decode to nothing, as in SentencePiece
                out.append(self._id_to_special[i])
        out.append(run.decode('utf-8', errors='replace'))
        return ''.join(out)

    def token_to_id(self, piece):
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        if self.kind == 'sentencepiece':
            i = self._sp.piece_to_id(piece)
            return None if i == self._unk_id else i
        if self.kind == 'tiktoken':
            try:
                return self._enc.encode_single_token(piece)
            except KeyError:
                return None
        if self.kind == 'tokenizers':
            return self._backend.token_to_id(piece)
        raw = piece.encode('utf-8')
        return raw[0] if len(raw) == 1 else None

    def to_dict(self):
        """Self-contained and torch.save(weights_only=True)-safe: a checkpoint rebuilds the
        tokenizer from this alone. Dropping the bytes values leaves the meta.json form."""
        return {**self._description, 'special_tokens': dict(self.special_tokens), 'vocab_size': self.vocab_size,
                'chat_template': self.chat_template}

    def _encode_bytes(self, text):
        if self.specials_pattern is None:
            return list(text.encode('utf-8'))
        ids = []
        for n, part in enumerate(self.specials_pattern.split(text)):  # odd parts are the specials matched
            ids.extend([self._text_specials[part]] if n % 2 else part.encode('utf-8'))
        return ids

    def _source(self):
        d = self._description
        return d.get('path') or d.get('name') or f'the {self.kind} tokenizer'

    def __reduce__(self):  # pickling (worker processes) goes through the plain description
        return load_tokenizer, (self.to_dict(),)

    def __repr__(self):
        return f"Tokenizer(kind={self.kind!r}, source={self._source()!r}, vocab_size={self.vocab_size})"


# -----------------------------------------------------------------------------
# loading

SAME_TEXTS = ('No princípio criou Deus os céus e a terra. 1948, R$ 3,50', 'आदि में परमेश्‍वर ने आकाश और पृथ्वी',
              'আদিতে ঈশ্বর আকাশমণ্ডল', '起初，神创造天地。', 'Emoji 🙂👋🏽 ok!', ' two  spaces\n\tand a tab\n')


def same_tokenizer(a, b):
    """True when two tokenizers give the same ids: same kind, same model (or ranks, or tokenizer.json
    text), same special tokens. A 'tokenizers' kind and another kind (a bytes or tiktoken tokenizer
    exported as tokenizer.json and read back) are the same when vocab, special tokens, bos/eos and
    the ids of sample texts in several scripts agree."""
    def fingerprint(t):
        d = t.to_dict()
        return (d['kind'], d.get('model_proto'), d.get('name'), d.get('ranks'), d.get('tokenizer_json'),
                t.bos_id, t.eos_id, sorted(t.special_tokens.items()))
    if fingerprint(a) == fingerprint(b):
        return True
    if a.kind == b.kind or 'tokenizers' not in (a.kind, b.kind):
        return False
    texts = list(SAME_TEXTS) + [f'{p} x{p}' for p in a.special_tokens if p in b._text_specials]
    return ((a.vocab_size, a.bos_id, a.eos_id, a.special_tokens) == (b.vocab_size, b.bos_id, b.eos_id, b.special_tokens)
            and a.encode_batch(texts) == b.encode_batch(texts))


def load_tokenizer(spec, base_dir=None):
    """spec: 'bytes', 'tiktoken:NAME', 'tiktoken:/path/x.tiktoken', a SentencePiece .model path, a
    tokenizer.json path, a Hugging Face model folder (load_hf_folder), a dict from to_dict() (or its
    meta.json form, with relative paths under base_dir)."""
    if isinstance(spec, Tokenizer):
        return spec
    if isinstance(spec, dict):
        return _load_from_dict(spec, base_dir)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"cannot load a tokenizer from {type(spec).__name__}: {SPEC_HELP}")
    spec = os.fspath(spec)
    if spec == 'bytes':
        return Tokenizer({'kind': 'bytes'})
    if spec.startswith('tiktoken:'):
        target = spec[len('tiktoken:'):]
        if not target:
            raise ValueError(f"empty tiktoken name in {spec!r}: {SPEC_HELP}")
        if target.endswith('.json') or os.path.isdir(target):
            raise ValueError(f"{target} is a Hugging Face tokenizer, not tiktoken ranks: pass it without 'tiktoken:'")
        if '/' in target or os.sep in target or target.endswith('.tiktoken'):
            return _load_from_dict({'kind': 'tiktoken', 'path': target}, base_dir)
        return Tokenizer({'kind': 'tiktoken', 'name': target, 'extra_special_tokens': DEFAULT_SPECIAL_TOKENS})
    if os.path.isdir(spec):
        return load_hf_folder(spec)
    if spec.endswith('.json') or _starts_with(spec, b'{'):  # tokenizer.json, whatever its name
        return _load_from_dict({'kind': 'tokenizers', 'path': spec}, base_dir)
    return _load_from_dict({'kind': 'sentencepiece', 'path': spec}, base_dir)


def _starts_with(path, prefix):
    try:
        with open(path, 'rb') as f:
            return f.read(len(prefix)) == prefix
    except OSError:
        return False


def _load_from_dict(d, base_dir):
    d = dict(d)
    kind = d.get('kind')
    if kind not in KINDS:
        raise ValueError(f"tokenizer description has kind {kind!r}; expected one of {KINDS}")
    field = TOKENIZER_FILES.get(kind, (None, None))[0]
    if field and d.get(field) is None and d.get('path'):  # meta.json form: read the file
        path = d['path'] if base_dir is None else os.path.join(base_dir, d['path'])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path} ({SPEC_HELP})")
        with open(path, 'rb') as f:
            d[field] = f.read()
        if kind == 'tiktoken' and 'special_tokens' not in d:
            d['extra_special_tokens'] = DEFAULT_SPECIAL_TOKENS
    if kind == 'sentencepiece' and d.get('model_proto') is None:
        raise ValueError(f"sentencepiece description needs 'model_proto' bytes or a 'path': {SPEC_HELP}")
    if kind == 'tiktoken' and d.get('ranks') is None and not d.get('name'):
        raise ValueError(f"tiktoken description needs a 'name', a 'path' or 'ranks': {SPEC_HELP}")
    if kind == 'tokenizers' and d.get('tokenizer_json') is None:
        raise ValueError(f"tokenizers description needs 'tokenizer_json' bytes or a 'path': {SPEC_HELP}")
    return Tokenizer(d)


def template_bos(tokenizer_json):
    """The special token a tokenizer.json's post-processor puts first (Llama's '<s> $A'), or None."""
    processor = json.loads(tokenizer_json).get('post_processor') or {}
    steps = processor.get('processors', [processor]) if processor.get('type') == 'Sequence' else [processor]
    for step in steps:
        if step.get('type') == 'TemplateProcessing' and step.get('single'):
            first = step['single'][0]
            if 'SpecialToken' in first:
                return first['SpecialToken']['id']
    return None


def load_hf_folder(path):
    """The tokenizer of a Hugging Face model folder: its SentencePiece tokenizer.model when it has one
    (plus the tokens transformers adds after it, see sentencepiece_with_added_tokens), else its
    tokenizer.json with bos/eos/pad as tokenizer_config.json (or special_tokens_map.json) names them."""
    if os.path.isfile(os.path.join(path, 'tokenizer.model')):
        return sentencepiece_with_added_tokens(path)
    file = os.path.join(path, 'tokenizer.json')
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} has neither a tokenizer.json nor a SentencePiece tokenizer.model")
    config = {}
    for name in ('special_tokens_map.json', 'tokenizer_config.json'):  # the second wins
        if os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name), encoding='utf-8') as f:
                config.update(json.load(f))
    description = {'kind': 'tokenizers', 'path': os.path.abspath(file)}
    for role in ('bos', 'eos', 'pad'):
        piece = config.get(f'{role}_token')
        piece = piece.get('content') if isinstance(piece, dict) else piece  # {"content": "<s>", ...} in older files
        if piece is not None:
            description[f'{role}_token'] = piece
    return _load_from_dict(description, None)


def sentencepiece_with_added_tokens(path):
    """The SentencePiece tokenizer.model of a Hugging Face folder as a mirim Tokenizer. Tokens that
    transformers adds after the SentencePiece vocab (tokenizer_config.json's added_tokens_decoder,
    e.g. chat markers) are appended to the model as user-defined pieces: same ids, and found in
    text as one token each, as transformers does."""
    from sentencepiece import sentencepiece_model_pb2
    model_file = os.path.join(path, 'tokenizer.model')
    with open(model_file, 'rb') as f:
        proto = sentencepiece_model_pb2.ModelProto.FromString(f.read())
    added = {}
    if os.path.isfile(os.path.join(path, 'tokenizer_config.json')):
        with open(os.path.join(path, 'tokenizer_config.json'), encoding='utf-8') as f:
            added = json.load(f).get('added_tokens_decoder') or {}
    size = len(proto.pieces)
    for i, piece in sorted((int(i), token['content']) for i, token in added.items()):
        if i < size and proto.pieces[i].piece != piece:
            raise ValueError(f"{path}: tokenizer_config.json renames id {i} from {proto.pieces[i].piece!r} to "
                             f"{piece!r}; mirim's tokenizer would not know that")
        if i >= size and i != len(proto.pieces):
            raise ValueError(f"{path}: added token {piece!r} has id {i}, but the ids after tokenizer.model's "
                             f"{size} pieces must follow on without gaps")
        if i >= size:
            proto.pieces.add(piece=piece, score=0.0, type=proto.SentencePiece.USER_DEFINED)
    description = {'kind': 'sentencepiece', 'model_proto': proto.SerializeToString()}
    if len(proto.pieces) == size:  # the file itself is the whole tokenizer
        description['path'] = os.path.abspath(model_file)
    return load_tokenizer(description)


def load_tiktoken_by_name(name):
    import tiktoken
    if name not in tiktoken.list_encoding_names():
        raise ValueError(f"unknown tiktoken encoding {name!r}; known: {', '.join(tiktoken.list_encoding_names())}"
                         f", or give a ranks file as tiktoken:/path/to/NAME.tiktoken")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken downloads its files on first use and caches them
        raise RuntimeError(
            f"could not load tiktoken encoding {name!r}: tiktoken downloads it on first use and no cached copy "
            f"was found ({type(e).__name__}). Run once with internet (cache: $TIKTOKEN_CACHE_DIR), or pass "
            f"the ranks file itself: tiktoken:/path/to/{name}.tiktoken") from e


def parse_tiktoken_ranks(data, where):
    """A .tiktoken file: one 'base64(token bytes) rank' per line."""
    try:
        return {base64.b64decode(token): int(rank)
                for token, rank in (line.split() for line in data.splitlines() if line.strip())}
    except ValueError as e:
        raise ValueError(f"{where} is not a tiktoken ranks file (lines of 'base64token rank'): {e}") from e


# -----------------------------------------------------------------------------
# training (SentencePiece)

def train_sentencepiece(input_paths_or_iter, out_path, vocab_size=8192, model_type='bpe',
                        special_tokens=DEFAULT_SPECIAL_TOKENS, character_coverage=0.9995,
                        input_sentence_size=2_000_000, max_sentence_length=4192, num_threads=None,
                        verbose=False):
    """Train SentencePiece and write out_path (plus a human-readable .vocab beside it).

    input_paths_or_iter: a path or glob, a list/tuple of them, or any other iterable of document
    strings (e.g. a generator; it is consumed once, streaming). Returns the Tokenizer.
    """
    import sentencepiece as spm
    check_vocab_size(vocab_size, special_tokens)
    if model_type not in ('bpe', 'unigram'):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if isinstance(input_paths_or_iter, (str, os.PathLike, list, tuple)):
        documents = read_blocks(expand_paths(input_paths_or_iter))
    else:
        documents = input_paths_or_iter
    sentences = _with_progress(training_sentences(documents, max_sentence_length), model_type, vocab_size)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size, model_type=model_type,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=list(special_tokens),
            byte_fallback=True,  # any character never seen in training becomes its UTF-8 bytes, not <unk>
            split_digits=True,  # numbers as digits: arithmetic-friendly and no vocab spent on "1948"
            # 0.9995 (SentencePiece's advice for CJK, whose long tail of ideographs would eat the
            # vocab): the rarest 0.05% of character occurrences get no piece of their own and fall
            # back to 1-4 byte tokens, so nothing is lost. In a small alphabet that tail is real
            # letters (in the Portuguese Bible: É, Ó, Ã, parentheses): pass 1.0 for a clean corpus.
            character_coverage=character_coverage,
            # identity: no NFKC, so decode(encode(x)) == x. NFKC would rewrite Chinese full-width
            # punctuation '，' to ',' and Devanagari nukta letters such as 'क़' into two code points.
            normalization_rule_name='identity', remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,  # runs of spaces are pieces: indentation survives
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,  # sample big corpora
            max_sentence_length=max_sentence_length, num_threads=num_threads or os.cpu_count(),
            minloglevel=0 if verbose else 2)
    except RuntimeError as e:  # e.g. "Vocabulary size too high" on a small corpus: one clear line
        if 'sentences_.empty()' in str(e):
            raise ValueError("the input is empty: there is no text to train a tokenizer on") from None
        raise ValueError(f"SentencePiece could not train a {vocab_size}-piece tokenizer on this input "
                         f"({str(e).strip().splitlines()[-1]})") from None
    write_atomic(out_path, model.getvalue())
    tok = load_tokenizer(out_path)
    vocab_lines = (f"{tok._sp.id_to_piece(i)}\t{tok._sp.get_score(i)}" for i in range(tok.vocab_size))
    write_atomic(os.path.splitext(out_path)[0] + '.vocab', ('\n'.join(vocab_lines) + '\n').encode('utf-8'))
    return tok


# -----------------------------------------------------------------------------
# training (byte-level BPE, with the `tokenizers` library, as cucafera, GPT-2 and Llama 3 were)

# How text is cut before BPE merges (no merge crosses a cut): cl100k's pattern, with \p{M} beside \p{L}
# (GPT-2's and cl100k's split Hindi and Bengali words at every vowel sign, which is a mark, not a letter),
# single digits (as SentencePiece's split_digits) and no English contractions. A word keeps the one
# space or punctuation mark before it; Chinese runs without spaces stay whole and BPE finds the words.
BYTELEVEL_PATTERN = (r"""[^\r\n\p{L}\p{M}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]|\s+(?!\S)|\s""")
BYTELEVEL_SPECIALS = ('<s>', '</s>', '<pad>')  # ids 0, 1, 2; then the chat tokens, then the 256 bytes


def train_bytelevel_bpe(input_paths_or_iter, out_path, vocab_size=8192, special_tokens=DEFAULT_SPECIAL_TOKENS,
                        min_frequency=2, verbose=False):
    """Train a byte-level BPE and write it as out_path (a tokenizer.json). Every byte is a token, so
    nothing is ever <unk>; <s> </s> <pad> and special_tokens are single tokens found in text. Inputs
    as train_sentencepiece's. Returns the Tokenizer."""
    from tokenizers import Regex, Tokenizer as Backend, decoders, models, pre_tokenizers, processors, trainers
    check_vocab_size(vocab_size, special_tokens)
    if isinstance(input_paths_or_iter, (str, os.PathLike, list, tuple)):
        documents = read_blocks(expand_paths(input_paths_or_iter))
    else:
        documents = input_paths_or_iter
    specials = list(dict.fromkeys([*BYTELEVEL_SPECIALS, *special_tokens]))
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BYTELEVEL_PATTERN), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=verbose)
    pieces = _with_progress(training_sentences(documents), 'byte-level BPE', vocab_size)
    try:
        backend.train_from_iterator(pieces, trainer=trainer)
    except Exception as e:  # the Rust side raises plain Exceptions
        raise ValueError(f"tokenizers could not train a {vocab_size}-piece byte-level BPE on this input ({e})") from None
    # as Llama's tokenizer.json: AutoTokenizer('text') starts with <s>, as mirim's documents do
    backend.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A <s> $B',
                                                           special_tokens=[('<s>', 0)])
    if backend.get_vocab_size() < vocab_size:
        print(f"note: the input holds only {backend.get_vocab_size():,} pieces' worth of merges "
              f"(asked for {vocab_size:,})", file=sys.stderr)
    write_atomic(out_path, backend.to_str(pretty=True).encode('utf-8'))
    return load_tokenizer(out_path)


def check_vocab_size(vocab_size, special_tokens=DEFAULT_SPECIAL_TOKENS):
    """ValueError unless vocab_size leaves room for pieces beyond the reserved ids (callers check it
    before they touch an output folder)."""
    reserved = 4 + len(special_tokens) + 256  # unk bos eos pad, specials, 256 byte pieces
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback and special tokens alone "
                         f"take {reserved} ids; use at least a few hundred more")


def _with_progress(sentences, model_type, vocab_size):  # model_type: words for the message
    from tqdm import tqdm
    # no bar when stderr is a log file or a pipe: each redraw would be one more line in the log
    yield from tqdm(sentences, desc='reading text for the tokenizer', unit=' pieces', disable=not sys.stderr.isatty())
    library = '' if 'byte' in model_type else 'SentencePiece '
    print(f"training a {vocab_size:,}-piece {library}{model_type} model...", flush=True)  # silent for a while


def training_sentences(documents, max_bytes=4192):
    """Documents -> pieces of at most max_bytes (SentencePiece silently skips longer sentences),
    cut at line ends where possible. Lines stay together with their newlines, as they will be
    encoded: a tokenizer trained on single lines never learns pieces such as '.\n', and costs
    ~5% more tokens on Bible chapters."""
    max_chars = max_bytes // 4  # a UTF-8 character is at most 4 bytes: a cut by characters is safe
    for document in documents:
        lines, size = [], 0
        for line in document.split('\n'):
            line_bytes = len(line.encode('utf-8')) + 1
            if lines and size + line_bytes > max_bytes:
                yield '\n'.join(lines)
                lines, size = [], 0
            if line_bytes > max_bytes:  # one very long line: cut it by characters
                yield from (line[start:start + max_chars] for start in range(0, len(line), max_chars))
            else:
                lines.append(line)
                size += line_bytes
        if lines and '\n'.join(lines).strip():
            yield '\n'.join(lines)


# -----------------------------------------------------------------------------
# how good is a tokenizer on some text

def tokenizer_stats(tok, texts, batch_size=1000):
    """Compression numbers on texts. bytes_per_token: higher is better (the byte tokenizer is 1.0).
    tokens_per_word ("fertility"): tokens per whitespace-separated word, lower is better; not
    meaningful for scripts written without spaces (Chinese, Japanese, Thai)."""
    tok = load_tokenizer(tok)
    totals = dict(documents=0, bytes=0, characters=0, words=0, tokens=0, unknown_tokens=0)
    texts = iter(texts)
    while batch := [t for _, t in zip(range(batch_size), texts)]:
        for text, ids in zip(batch, tok.encode_batch(batch)):
            totals['documents'] += 1
            totals['bytes'] += len(text.encode('utf-8'))
            totals['characters'] += len(text)
            totals['words'] += len(text.split())
            totals['tokens'] += len(ids)
            totals['unknown_tokens'] += ids.count(tok._unk_id) if tok._unk_id is not None else 0
    tokens = max(totals['tokens'], 1)
    words = max(totals['words'], 1)
    return dict(totals, bytes_per_token=totals['bytes'] / tokens, characters_per_token=totals['characters'] / tokens,
                tokens_per_word=totals['tokens'] / words, bytes_per_word=totals['bytes'] / words)




def read_blocks(paths, max_chars=1 << 20):
    """Text files -> blank-line-separated blocks (paragraphs), streaming, each at most ~max_chars.
    Lines that are not UTF-8 are read with U+FFFD replacement characters and reported on stderr,
    once per file: a Latin-1 file would otherwise silently teach the tokenizer pieces of U+FFFD."""
    for path in paths:
        block = []
        size = 0
        bad, first_bad = 0, None
        with open(path, 'rb') as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode('utf-8')
                except UnicodeDecodeError:
                    line = raw.decode('utf-8', errors='replace')
                    bad, first_bad = bad + 1, first_bad or number
                line = line.replace('\r\n', '\n')  # as text mode read it
                if line.strip():
                    block.append(line.rstrip('\n'))
                    size += len(line)
                if block and (not line.strip() or size >= max_chars):
                    yield '\n'.join(block)
                    block, size = [], 0
        if block:
            yield '\n'.join(block)
        if bad:
            print(f"warning: {path}: {bad:,} line(s) are not valid UTF-8 (first: line {first_bad}) and were read with "
                  f"U+FFFD replacement characters, which the tokenizer learns as text; convert the file to UTF-8 "
                  f"first (e.g. iconv -f latin1 -t utf-8)", file=sys.stderr)


def expand_paths(patterns):
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths = []
    for pattern in map(os.fspath, patterns):
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"no input file matches {pattern!r} (to train from texts in memory, "
                                    f"pass an iterator such as iter(texts))")
        paths.extend(matches)
    return paths
