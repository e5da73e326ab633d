"""Tokenizers the GPU presets load: DeBERTa-v3 ships only a sentencepiece model (spm.model), which
transformers 5 turns into its tokenizer with the `sentencepiece` package."""

import json

import pytest

from app.config import load_config
from app.modeling import build_tokenizer
from app.synthetic import generate_pairs


@pytest.fixture(scope="module")
def deberta_v3_folder(tmp_path_factory):
    """A folder shaped like microsoft/deberta-v3-large's tokenizer files: config.json, spm.model and a
    tokenizer_config.json without a tokenizer class, the sentencepiece model trained here on the project's
    own synthetic text (DeBERTa-v3's specials: [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3)."""
    import sentencepiece  # a project dependency (pyproject.toml): a missing one must fail here, not skip
    from transformers import DebertaV2Config

    folder = tmp_path_factory.mktemp("deberta-v3")
    corpus = folder / "corpus.txt"
    frame = generate_pairs(300, seed=1)
    corpus.write_text("\n".join(text for column in ("prompt", "response_a", "response_b")
                                for cell in frame[column] for text in json.loads(cell) if text))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spm"), vocab_size=400, model_type="unigram",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]",
        unk_piece="[UNK]", user_defined_symbols=["[MASK]"])
    (folder / "spm.vocab").unlink()
    corpus.unlink()
    DebertaV2Config(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "vocab_type": "spm"}))
    return folder


def test_a_deberta_v3_tokenizer_builds_from_its_sentencepiece_model(deberta_v3_folder):
    tokenizer = build_tokenizer(load_config(None, {"model.name_or_path": str(deberta_v3_folder)}))
    assert type(tokenizer).__name__.startswith("DebertaV2Tokenizer")
    ids = tokenizer("Response A explains the answer step by step.", "Response B is shorter.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id == 1 and ids[-1] == tokenizer.sep_token_id == 2
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.pad_token_id == 0
    assert tokenizer.decode(ids[1:-1]).startswith("Response A explains")
