"""Apply: write a study's best values (learning rate, batch size, dropout and any optional dimension searched) into
params.yaml, comments kept."""

from __future__ import annotations

import io
from pathlib import Path

import optuna
import yaml as pyyaml
from optuna.trial import TrialState

from tunepipe.errors import UserError
from tunepipe.files import write_text
from tunepipe.params import parse_params
from tunepipe.sweep.study import OPTIONAL, TUNED

# ---- apply ----

def _round_trip_yaml():
    """ruamel round-trip, writing new floats with a '.' (PyYAML reads 1e-05 as a string) and None as null."""
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    def represent_float(rep, value: float):
        text = repr(value)
        mantissa, _, exp = text.partition("e")
        if exp and "." not in mantissa:
            text = f"{mantissa}.0e{exp}"
        return rep.represent_scalar("tag:yaml.org,2002:float", text)

    class Representer(RoundTripRepresenter):  # a subclass: ruamel's registries are class-wide
        pass

    Representer.add_representer(float, represent_float)
    Representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    yaml = YAML()
    yaml.Representer = Representer
    return yaml


def apply_best(params_file: str | Path, values: dict) -> list[str]:
    """Write the trial's values (finetune.learning_rate/batch_size/dropout, adversarial/adversarial_epsilon when
    searched) into params.yaml; comments, order and the rest kept."""
    from ruamel.yaml.comments import CommentedMap

    path = Path(params_file)
    yaml = _round_trip_yaml()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    doc = yaml.load(path.read_text(encoding="utf-8")) or CommentedMap()
    if doc.get("finetune") is None:
        doc["finetune"] = CommentedMap()
    ft, changes = doc["finetune"], []
    for key in (k for k in (*TUNED, *OPTIONAL) if k in values):
        kind = {"batch_size": int, "adversarial": str}.get(key, float)
        old, value = ft.get(key), kind(values[key])
        if old != value:
            ft[key] = value
            changes.append(f"finetune.{key}: {old if old is None else type(value)(old)!r} -> {value!r}")
    buf = io.StringIO()
    yaml.dump(doc, buf)
    parse_params(pyyaml.safe_load(buf.getvalue()), str(path))  # never write a params file that does not validate
    write_text(path, buf.getvalue())
    return changes


def _apply(study: optuna.Study, params_file: str | Path) -> None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"sweep apply: study '{study.study_name}' has no complete trial yet; run `tunepipe sweep`")
    best = max(complete, key=lambda t: t.value)
    changes = apply_best(params_file, best.params)
    print(f"sweep: {params_file} <- trial {best.number} ({best.value:.4f}): "
          + ("; ".join(changes) if changes else "already set"), flush=True)
