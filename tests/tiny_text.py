"""Tiny model folders *with tokenizers* for pipeline tests of the task types (no download, no real vocabulary).

The tokenizers are character-level WordPiece (every lowercase word splits into letters), so any English-ish
text tokenizes within the tiny models' 100-token vocabulary:

* ``bert_folder(path)``: the tiny BERT of tests/tiny.py + a ``BertTokenizer`` ([CLS] text [SEP]);
* ``t5_folder(path)``: the tiny T5 + a fast tokenizer that appends ``</s>`` (pad 0, eos 1, as T5).
"""

from __future__ import annotations

import string
from pathlib import Path

from tests.tiny import VOCAB, build_bert, make_tiny

PIECES = list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase] + list(string.digits) + list(".,!?'-#:")


def _vocab(special: list[str]) -> list[str]:
    vocab = special + PIECES
    assert len(vocab) <= VOCAB
    return vocab


def bert_folder(path: Path) -> Path:
    """Save the tiny BERT (BertModel weights; a classification head is added on loading) and its tokenizer.

    Weights start wider than BERT's usual 0.02 (as tests/lm.py does for its Llama): a 32-wide random encoder
    otherwise gives nearly the same pooled vector for every text, and a few steps learn nothing.
    """
    from transformers import BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    build_bert(initializer_range=0.2).save_pretrained(path)
    vocab = {tok: i for i, tok in enumerate(_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))}
    BertTokenizer(vocab=vocab, do_lower_case=True).save_pretrained(path)
    return path


def t5_folder(path: Path) -> Path:
    """Save the tiny T5 and a character-level tokenizer with T5's special ids (<pad> 0, </s> 1, <unk> 2)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    make_tiny("t5").build().save_pretrained(path)
    vocab = {tok: i for i, tok in enumerate(_vocab(["<pad>", "</s>", "<unk>"]))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return path
