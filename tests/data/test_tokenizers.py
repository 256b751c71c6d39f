"""Real pretrained tokenizers that install offline (.ci/setup.d/tokenizers.sh): sentencepiece 32k
(mistral-common's tokenizer.model.v1) and BERT WordPiece (all-MiniLM-L6-v2 tokenizer.json)."""

import json
from pathlib import Path

import pyarrow as pa
import pytest

from llmtrain.config.data import DataConfig, DataSourceConfig
from llmtrain.data import DataError, DatasetIndex
from llmtrain.data.build import check_tokenizer
from llmtrain.data.prepare import prepare_dataset
from llmtrain.data.tokenizer import bundled_tokenizer_files, load_tokenizer

FILES = bundled_tokenizer_files()
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    " ".join(f"word{i} and more text" for i in range(300)),  # > 512 tokens: must not be truncated
]


def needs(name: str) -> Path:
    if name not in FILES:
        pytest.skip(f"{name} tokenizer not installed (run .ci/setup.d/tokenizers.sh)")
    return FILES[name]


def rows(folder: Path) -> list[list[int]]:
    index = DatasetIndex.load(folder)
    out = []
    for info in index.shards:
        with pa.memory_map(str(folder / info.file)) as f:
            out += pa.ipc.open_file(f).read_all().column(0).to_pylist()
    return out


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4))
    return path


def test_sentencepiece_32k_round_trips(raw: Path, tmp_path: Path) -> None:
    model = needs("sentencepiece-32k")
    index = prepare_dataset(raw, tmp_path / "sp", str(model), workers=2, chunk_docs=3)
    tok = load_tokenizer(str(model))
    assert index.vocab_size == 32000 and index.tokenizer == tok.identity and index.tokenizer.startswith("sp:")
    docs = rows(tmp_path / "sp")
    assert len(docs) == 12 and all(d[-1] == tok.eos_id == 2 for d in docs)
    assert [tok.decode(d[:-1]) for d in docs] == TEXTS * 4


def test_bert_wordpiece_is_neither_padded_nor_truncated(raw: Path, tmp_path: Path) -> None:
    path = needs("bert-wordpiece")
    index = prepare_dataset(raw, tmp_path / "bert", str(path), workers=2, chunk_docs=3)
    tok = load_tokenizer(str(path))
    assert index.vocab_size == 30522 and tok.eos_id == 102  # [SEP] separates documents
    docs = rows(tmp_path / "bert")
    assert len(docs[0]) < 20 and len(docs[2]) > 600  # tokenizer.json pads/truncates to 128: disabled
    assert tok.decode(docs[0][:-1]) == TEXTS[0].lower()
    assert 0 not in docs[0]  # no [PAD]


def test_shards_and_config_must_use_the_same_tokenizer(raw: Path, tmp_path: Path) -> None:
    sp, bert = needs("sentencepiece-32k"), needs("bert-wordpiece")
    prepare_dataset(raw, tmp_path / "sp", str(sp))
    cfg = DataConfig(sources=[DataSourceConfig(path=str(tmp_path / "sp"))], tokenizer=str(bert))
    with pytest.raises(
        DataError, match=r"sp/index\.json: shards were tokenized with 'sp:tokenizer\.model\.v1"
    ):
        check_tokenizer(cfg, vocab_size=32000)
    check_tokenizer(DataConfig(sources=cfg.sources, tokenizer=str(sp)), vocab_size=32000)


@pytest.mark.parametrize("name", ["byte", "sentencepiece-32k", "bert-wordpiece"])
def test_special_token_strings_in_text_encode_as_in_training(name: str, tmp_path: Path) -> None:
    """A document quoting a special token's string: the exported HF tokenizer gives the ids training
    gave, whether it is loaded with AutoTokenizer or as PreTrainedTokenizerFast from the folder."""
    transformers = pytest.importorskip("transformers")
    from llmtrain.checkpoint.hf_tokenizer import export_tokenizer

    spec = "byte" if name == "byte" else str(bundled_tokenizer_files().get(name, ""))
    if spec == "":
        pytest.skip(f"{name} is not installed (.ci/setup.d/tokenizers.sh installs it)")
    export_tokenizer(spec, tmp_path, 512)
    ours = load_tokenizer(spec)
    texts = ["end <eos> here<pad>", "a</s>b <s> [SEP] [PAD]", "<|endoftext|> <unk>", "plain text"]
    for hf in (
        transformers.AutoTokenizer.from_pretrained(tmp_path),
        transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path),
    ):
        assert hf.eos_token_id == ours.eos_id
        for text in texts:
            assert hf.encode(text, add_special_tokens=False) == ours.encode(text), (name, text)
    if name == "byte":
        assert ours.encode("<eos>") == list(b"<eos>")  # bytes, never the EOS id 256
        assert hf.decode([104, 256, 105], skip_special_tokens=True) == "hi"
