"""Models and inputs that do not fit (issue 11): a max_length beyond the model's positions, CoNLL files with a
byte-order mark or no-break spaces, a tokenizer without a pad token, a model that needs remote code, a model
directory that is missing or incomplete. Each stops with a UserError naming the key, or just works."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest

from stages import augment, evaluate, finetune, prepare
from stages import tokenization as tokenize
from tests.helpers import synthetic_rows
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.modeling import build_model, load_tokenizer
from tunepipe.params import load_params
from tunepipe.tasks import get_task
from tunepipe.tasks.ner.data import read_conll
from tunepipe.tasks.ner.encode import IGNORED, tokenize_words, word_features

EOT = "<|endoftext|>"


def tiny_gpt2(out: Path, specials: bool = True) -> Path:
    """A 2-layer, 32-wide GPT-2 with random weights and a byte-level BPE trained here: like GPT-2's tokenizer, it
    has an end-of-text token and no pad token (specials=False: no special tokens at all)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOT] if specials else [], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([text for text, _ in synthetic_rows(300)], trainer)
    named = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT} if specials else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, model_input_names=["input_ids", "attention_mask"], **named)
    assert tok.pad_token is None
    tok.save_pretrained(out)
    eot = tok.convert_tokens_to_ids(EOT) if specials else None
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=eot,
                        eos_token_id=eot)
    torch.manual_seed(0)
    GPT2Model(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


def copy_model(src: Path, dest: Path, config: dict | None = None, tokenizer_config: dict | None = None) -> Path:
    """A copy of a saved model with config.json / tokenizer_config.json keys changed."""
    shutil.copytree(src, dest)
    for name, changes in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        if changes:
            data = json.loads((dest / name).read_text())
            (dest / name).write_text(json.dumps({**data, **changes}))
    return dest


# --- 1. tokenize.max_length beyond what the model takes ------------------------------------------------------

def test_max_length_beyond_the_models_positions_stops_tokenize(project):
    root = project(**{"tokenize.max_length": 200})  # the tiny BERT has 128 positions (its tokenizer says 512)
    prepare.main()
    with pytest.raises(UserError, match=r"^tokenize\.max_length: 200 is more than model\.name '.*' takes \(128 "
                                        r"tokens: max_position_embeddings in its config\.json\); set "
                                        r"tokenize\.max_length to 128 or less$"):
        tokenize.main()
    assert not (root / "data/tokenized").exists()  # nothing half-written

    project(**{"tokenize.max_length": 128})  # exactly the limit is fine
    tokenize.main()
    assert read_json(root / "reports/tokenize.json")["max_length"] == 128


def test_max_length_beyond_the_tokenizers_declared_limit(project, tiny_model_dir, tmp_path):
    # RoBERTa-style: more positions than tokens (the tokenizer's model_max_length is the real limit).
    short = copy_model(tiny_model_dir, tmp_path / "short", tokenizer_config={"model_max_length": 100})
    project(**{"model.name": str(short), "tokenize.max_length": 120})
    prepare.main()
    with pytest.raises(UserError, match=r"tokenize\.max_length: 120 .* \(100 tokens: the tokenizer's "
                                        r"model_max_length\); set tokenize\.max_length to 100 or less"):
        tokenize.main()


def test_local_model_directory_warns_that_dvc_does_not_track_it(project, tiny_model_dir, capsys):
    """model.name is a param in dvc.yaml; the files of a local model directory are not a dependency."""
    project()  # model.name: the tiny model's directory
    prepare.main()
    tokenize.main()
    err = capsys.readouterr().err
    assert err.count("DVC does not track") == 1
    assert f"model.name: {tiny_model_dir} is a local directory" in err and "`dvc repro -f tokenize`" in err
    from tunepipe.modeling import untracked_model

    assert untracked_model("builtin:minilm-l6") is None and untracked_model("bert-base-uncased") is None


# --- 2. CoNLL files: a byte-order mark, no-break spaces, words without sub-tokens ----------------------------

def test_conll_with_a_bom_and_no_break_spaces(tmp_path, tiny_model_dir):
    path = tmp_path / "eng.train"
    lines = ["-DOCSTART- -X- -X- O", "", "New\u00a0York NNP I-NP B-LOC", "is VBZ I-VP O", "big JJ I-ADJP O", "",
             "Acme NNP I-NP B-ORG", "\u00a0 NNP I-NP O", "sells VBZ I-VP O", "\u200b NN I-NP O", ""]
    # A Windows editor's file: a byte-order mark and CRLF line ends.
    path.write_bytes("\r\n".join(lines).encode("utf-8-sig"))
    sents = read_conll(path)
    assert [s.tokens for s in sents] == [["New\u00a0York", "is", "big"], ["Acme", "\u00a0", "sells", "\u200b"]]
    assert [s.tags for s in sents] == [["B-LOC", "O", "O"], ["B-ORG", "O", "O", "O"]]
    assert sents[0].where(0) == f"{path}:3"  # line numbers still match the file
    assert read_conll(path, "UTF-8")[0].tokens[0] == "New\u00a0York"  # an explicit utf-8 strips the mark too

    # The word with a no-break space keeps its tag on its first sub-token; the words after it keep theirs.
    # Words the tokenizer turns into nothing (a lone no-break space, a zero-width space at the end) get no label
    # and are counted as such, not as truncation.
    labels = ["B-LOC", "B-ORG", "I-LOC", "I-ORG", "O"]
    words = datasets.Dataset.from_dict({"tokens": [s.tokens for s in sents], "tags": [s.tags for s in sents]},
                                       features=word_features(labels))
    enc = tokenize_words(words, load_tokenizer(str(tiny_model_dir)), 32, label_all=False)
    first = enc[0]
    labelled = [(w, labels[lab]) for w, lab in zip(first["word_ids"], first["labels"], strict=True) if lab != IGNORED]
    assert labelled == [(0, "B-LOC"), (1, "O"), (2, "O")]
    assert first["word_ids"][:4] == [-1, 0, 0, 1]  # new, york: one word
    second = enc[1]
    assert sorted({w for w in second["word_ids"] if w >= 0}) == [0, 2]
    assert second["words_empty"] == 2 and second["words_cut"] == 0
    assert enc["words_cut"] == [0, 0]


# --- 3. a tokenizer without a pad token (GPT-2 style) --------------------------------------------------------

def test_model_without_a_pad_token_trains_and_evaluates(project, gpt2_dir):
    root = project(n_rows=90, **{"model.name": str(gpt2_dir), "finetune.epochs": 1.0})
    prepare.main()
    tokenize.main()
    augment.main()
    finetune.main()  # batches of texts of different lengths: they need padding
    saved = root / "models/model"
    tok_config = json.loads((saved / "tokenizer_config.json").read_text())
    assert tok_config["pad_token"] == EOT  # padded with end-of-text, as transformers' run_classification does
    eot = load_tokenizer(str(gpt2_dir)).eos_token_id
    assert json.loads((saved / "config.json").read_text())["pad_token_id"] == eot
    evaluate.main()
    assert read_json(root / "reports/metrics.json")["n_test"] == 9


def test_tokenizer_without_pad_eos_or_unk_is_a_user_error(tmp_path):
    bare = tiny_gpt2(tmp_path / "bare", specials=False)
    with pytest.raises(UserError, match=r"^model\.name: the tokenizer of '.*bare' has no pad token, and no "
                                        r"end-of-sequence or unknown token to pad with; pick a model"):
        load_tokenizer(str(bare))


# --- 4. a model that needs remote code -----------------------------------------------------------------------

def test_model_needing_remote_code_is_refused_by_name(project, tiny_model_dir, tmp_path):
    custom = copy_model(tiny_model_dir, tmp_path / "custom", config={
        "model_type": "fancy-encoder",
        "auto_map": {"AutoConfig": "configuration_fancy.FancyConfig", "AutoModel": "modeling_fancy.FancyModel"}})
    message = (r"^model\.name: '.*custom' needs custom Python code shipped with the model \(auto_map, "
               r"trust_remote_code\); tunepipe does not run remote code: pick a model whose architecture transformers "
               r"supports")
    project(**{"model.name": str(custom)})
    prepare.main()
    with pytest.raises(UserError, match=message):
        tokenize.main()  # its tokenizer alone would load: the config is checked first
    p = load_params()
    with pytest.raises(UserError, match=message):  # what finetune builds
        build_model(p.model.name, ["negative", "positive"], p.finetune, get_task("classification"))


# --- 5. model.name: a directory that is missing or incomplete -------------------------------------------------

def test_missing_or_incomplete_model_directory(project, tiny_model_dir, tmp_path):
    missing = tmp_path / "models" / "no-such-model"
    project(**{"model.name": str(missing)})
    prepare.main()
    with pytest.raises(UserError, match=rf"^model\.name: directory not found: {missing}; point it at a saved model "
                                        "directory"):
        tokenize.main()

    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    project(**{"model.name": str(no_config)})
    with pytest.raises(UserError, match=r"^model\.name: .*no-config is a path without a config\.json"):
        tokenize.main()

    # Weights and config but no tokenizer files: transformers would build an empty tokenizer (every word [UNK]).
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, no_tokenizer / name)
    project(**{"model.name": str(no_tokenizer)})
    with pytest.raises(UserError, match=r"^model\.name: '.*no-tokenizer' has no tokenizer files \(tokenizer\.json "
                                        r"or a vocabulary\); save the tokenizer beside the model"):
        tokenize.main()

    # A tokenizer but no weights: finetune's model load names model.name too.
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, no_weights / name)
    ft = load_params().finetune
    with pytest.raises(UserError, match=r"^model\.name: could not load model weights from '.*no-weights': "):
        build_model(str(no_weights), ["a", "b"], ft, get_task("classification"))
