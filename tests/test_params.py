import pytest
import yaml

from tests.helpers import REPO
from tunepipe.errors import UserError
from tunepipe.params import load_params, parse_params


def test_repository_params_are_valid():
    p = load_params(REPO / "params.yaml")
    assert p.task == "classification"
    assert p.data.source == "builtin:tweets"
    assert p.model.name == "builtin:minilm-l6"


@pytest.mark.parametrize("raw, message", [
    ({"finetune": {"learning_rate": -1}}, "finetune.learning_rate: Input should be greater than 0"),
    ({"finetune": {"learnig_rate": 1e-4}}, "finetune.learnig_rate: unknown key"),
    ({"finetune": {"batch_size": "many"}}, "finetune.batch_size: Input should be a valid integer"),
    ({"data": {"max_train_samples": 0}}, "data.max_train_samples: Input should be greater than 0"),
    ({"augment": {"method": "backtranslate"}}, "augment.method: Input should be"),
    ({"sweep": {"learning_rate": [1e-3, 1e-5]}}, "sweep.learning_rate: range must be"),
    ({"sweep": {"trials": 0}}, "sweep.trials: Input should be greater than 0"),
    ({"task": "regression"}, "task: Input should be"),
    # a loss or an error: promotion would move the champion for a worse model
    ({"promote": {"metric": "hamming_loss"}}, "promote.metric: 'hamming_loss' is lower-is-better"),
    ({"promote": {"metric": "ece"}}, "promote.metric: 'ece' is lower-is-better"),
    ({"promote": {"metric": "brier_uncalibrated"}}, "promote.metric: 'brier_uncalibrated' is lower"),
])
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_params(raw)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("finetune: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(UserError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_defaults_round_trip():
    p = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert parse_params(p.model_dump()) == p


def test_params_yaml_holds_every_key_with_the_schema_defaults():
    """One source of truth: params.yaml names every key, and the schema's defaults (for code that builds params
    without the file: tests, benchmarks) are exactly its values."""
    from tunepipe.params import Params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = Params().model_dump(mode="json")
    for section, values in defaults.items():
        assert section in raw, f"params.yaml lacks the {section} section"
        if isinstance(values, dict):
            assert set(raw[section]) == set(values), f"params.yaml {section}: keys differ from the schema"
    assert load_params(REPO / "params.yaml").model_dump(mode="json") == defaults
