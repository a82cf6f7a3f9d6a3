"""Adversarial training (finetune.adversarial: fgm | pgd): the gradients it produces against an independent
computation, learning with it, the PGD projection, bad params, and the sweep's optional search dimensions."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import datasets
import mlflow
import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages import augment, finetune, prepare
from stages import tokenization as tokenize
from tests.helpers import REPO, write_tiny_dir
from tunepipe.cli import main as cli
from tunepipe.errors import UserError
from tunepipe.files import read_json
from tunepipe.params import load_params, parse_params
from tunepipe.sweep import study as sweep_study
from tunepipe.training import build_trainer, perturbation_step


def front(root, task: str = "classification") -> datasets.DatasetDict:
    if task == "ner":
        write_tiny_dir(root)
    prepare.main()
    tokenize.main()
    augment.main()
    return datasets.load_from_disk(str(root / "data/augmented"))


# ---- the perturbation's gradients, against the same attack written without hooks or Trainer ----

def reference(model, batch, method: str, epsilon: float, steps: int, alpha: float, bf16: bool):
    """FGM/PGD on `inputs_embeds` (no hook): (clean loss, adversarial loss, clean-only grads, total grads)."""
    emb = model.get_input_embeddings()
    ids, rest = batch["input_ids"], {k: v for k, v in batch.items() if k != "input_ids"}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def loss_at(delta):
        with autocast:
            return model(inputs_embeds=emb(ids) + delta, **rest).loss

    def grads():
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    if method == "fgm":
        steps, alpha = 1, epsilon
    model.zero_grad()
    zero = torch.zeros(*ids.shape, emb.embedding_dim, requires_grad=True)
    clean = loss_at(zero)
    clean.backward()
    clean_grads, g, r = grads(), zero.grad, torch.zeros_like(zero)
    for k in range(steps):
        r = r + alpha * g / g.norm()
        if r.norm() > epsilon:
            r = r * (epsilon / r.norm())
        if k < steps - 1:
            r = r.detach().requires_grad_()
            (g,) = torch.autograd.grad(loss_at(r), r)
    adv = loss_at(r.detach())
    adv.backward()
    total = grads()
    model.zero_grad()
    return clean.item(), adv.item(), clean_grads, total


@pytest.mark.parametrize(("task", "method", "precision", "peft"), [
    ("classification", "fgm", "fp32", "full"),
    ("classification", "fgm", "bf16", "full"),
    ("classification", "fgm", "fp32", "lora"),
    ("classification", "pgd", "fp32", "full"),
    ("classification", "pgd", "bf16", "lora"),
    ("ner", "fgm", "fp32", "full"),
    ("ner", "pgd", "bf16", "full"),
])
def test_training_step_adds_the_perturbed_inputs_gradients(project, task, method, precision, peft):
    extra = {"task": task, "data.source": "data/raw/conll"} if task == "ner" else {}
    root = project(**extra, **{"finetune.adversarial": method, "finetune.precision": precision,
                               "finetune.method": peft, "finetune.adversarial_epsilon": 5.0,
                               "finetune.adversarial_alpha": 2.0, "finetune.adversarial_steps": 3})
    dsd = front(root, task)
    p = load_params()
    trainer = build_trainer(p, dsd, read_json(root / "data/prepared/meta.json")["labels"], str(root / "out"))
    model = trainer.model
    for m in model.modules():  # deterministic forwards, so both computations see the same network
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which this test skips
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ft = p.finetune
    clean, adv, clean_grads, expected = reference(model, batch, method, ft.adversarial_epsilon,
                                                  ft.adversarial_steps, ft.adversarial_alpha, precision == "bf16")
    assert adv > clean  # the perturbation ascends the loss
    emb = model.get_input_embeddings()
    weight = emb.weight.detach().clone()

    loss = trainer.training_step(model, batch)

    assert torch.equal(emb.weight, weight) and not emb._forward_hooks  # nothing left behind
    assert loss.item() == pytest.approx(clean, rel=1e-4)  # the clean loss is what Trainer logs
    got = {n: q.grad for n, q in model.named_parameters() if q.grad is not None}
    assert got.keys() == expected.keys() and got
    if peft == "lora":
        assert not emb.weight.requires_grad and all("lora_" in n or "classifier" in n or "score" in n for n in got)
    flat = {k: torch.cat([v[n].float().flatten() for n in sorted(got)])
            for k, v in (("got", got), ("expected", expected), ("clean", clean_grads))}
    size = flat["expected"].norm()
    error = (flat["got"] - flat["expected"]).norm() / size
    # What the perturbation adds beyond a second clean pass: the test tells a wrong (or no) perturbation apart.
    effect = (flat["expected"] - 2 * flat["clean"]).norm() / size
    assert error <= (1e-2 if precision == "bf16" else 1e-5)
    assert effect > 10 * error


@pytest.mark.parametrize(("method", "passes"), [("fgm", 2), ("pgd", 4)])
def test_class_weights_apply_to_the_adversarial_loss(project, method, passes):
    """Every pass (clean, PGD's inner steps, the last perturbed one) goes through the weighted loss."""
    root = project(**{"finetune.adversarial": method, "finetune.adversarial_epsilon": 5.0,
                      "finetune.adversarial_alpha": 2.0, "finetune.class_weights": {"positive": 5.0}})
    dsd = front(root)
    trainer = build_trainer(load_params(), dsd, read_json(root / "data/prepared/meta.json")["labels"],
                            str(root / "out"))
    weighted, losses = trainer.compute_loss_func, []

    def spy(outputs, labels, num_items_in_batch=None):
        losses.append(weighted(outputs, labels, num_items_in_batch=num_items_in_batch))
        return losses[-1]

    trainer.compute_loss_func = spy
    for m in trainer.model.modules():  # no dropout noise in the loss comparison below
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    trainer.current_gradient_accumulation_steps = 1
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.training_step(trainer.model, batch)
    assert len(losses) == passes and "labels" in batch  # the caller's batch is intact for the later passes
    assert loss.item() == losses[0].item()  # the clean loss is returned
    assert all(later.item() > losses[0].item() for later in losses[1:])  # each perturbed input is worse


# ---- training with it ----

def test_fgm_and_pgd_change_training_and_still_learn(project):
    # epsilon is an L2 norm over the batch's embeddings, and the attack concentrates on the keywords: the tiny
    # model's embeddings are small (init std 0.02, 32 wide), so a perturbation that leaves them learnable is far
    # smaller than for a real model. Its plateau before it finds the keywords is long and varies with any change
    # to the run (none included), hence 5 epochs at a high learning rate and a threshold well above the
    # constant-class macro-F1 (1/6).
    root = project(n_rows=240, **{"finetune.epochs": 5.0, "finetune.learning_rate": 1e-2,
                                  "finetune.adversarial_epsilon": 0.01, "finetune.adversarial_alpha": 0.004})
    front(root)
    weights, summaries = {}, {}
    for method in ("none", "fgm", "pgd"):
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["finetune"]["adversarial"] = method
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        if method == "pgd":  # from the command line, as `dvc repro` runs it
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            env.pop("MLFLOW_TRACKING_URI", None)
            res = subprocess.run([sys.executable, "-m", "stages.finetune"], cwd=root, env=env, capture_output=True,
                                 text=True)
            assert res.returncode == 0, res.stderr[-3000:]
        else:
            finetune.main()
        weights[method] = load_file(root / "models/model/model.safetensors")
        summaries[method] = read_json(root / "reports/train.json")
        info = read_json(root / "models/model/training_info.json")
        assert info["adversarial"] == summaries[method]["adversarial"]
    assert summaries["none"]["adversarial"] is None
    assert summaries["fgm"]["adversarial"] == {"method": "fgm", "epsilon": 0.01}
    assert summaries["pgd"]["adversarial"] == {"method": "pgd", "epsilon": 0.01, "steps": 3, "alpha": 0.004}
    for method in ("fgm", "pgd"):
        assert summaries[method]["best_val_macro_f1"] > 0.5, (method, summaries)  # keywords carry the label
        assert summaries[method]["global_step"] == summaries["none"]["global_step"]
        differ = [k for k in weights["none"] if not torch.equal(weights["none"][k], weights[method][k])]
        assert len(differ) > len(weights["none"]) // 2, method
    assert summaries["none"]["best_val_macro_f1"] > 0.5


# ---- the projection ----

def test_pgd_steps_stay_within_epsilon():
    torch.manual_seed(0)
    eps, alpha = 1.5, 0.4
    delta = torch.zeros(4, 7, 8)
    norms = []
    for _ in range(30):
        delta = perturbation_step(delta, torch.randn(4, 7, 8) + 0.5, alpha, eps)
        norms.append(delta.norm().item())
    assert max(norms) <= eps * (1 + 1e-6)
    assert norms[-1] == pytest.approx(eps, rel=1e-5)  # a steady ascent direction pushes it to the boundary
    assert norms[0] == pytest.approx(alpha, rel=1e-5)  # a first step inside the ball is not projected

    g = torch.randn(3, 5)
    fgm = perturbation_step(torch.zeros(3, 5), g, eps, eps)  # FGM: one step of size epsilon along g
    assert torch.allclose(fgm, eps * g / g.norm())
    start = torch.ones(3, 5) * 0.1
    for bad in (torch.zeros(3, 5), torch.full((3, 5), float("inf")), torch.full((3, 5), float("nan")), None):
        assert torch.equal(perturbation_step(start, bad, alpha, eps), start)  # no direction: no move


# ---- bad params ----

@pytest.mark.parametrize(("finetune_params", "message"), [
    ({"adversarial": "fgsm"}, "finetune.adversarial: Input should be 'none', 'fgm' or 'pgd'"),
    ({"adversarial": "pgd", "adversarial_alpha": 2.0},
     "finetune.adversarial_alpha: 2 is larger than finetune.adversarial_epsilon 1"),
    ({"adversarial": "pgd", "adversarial_steps": 0}, "finetune.adversarial_steps: Input should be greater than"),
    ({"adversarial": "fgm", "adversarial_epsilon": 0}, "finetune.adversarial_epsilon: Input should be greater than"),
])
def test_bad_adversarial_params_give_one_line(finetune_params, message):
    with pytest.raises(UserError) as exc:
        parse_params({"finetune": finetune_params})
    assert str(exc.value).startswith(f"params.yaml: {message}") and "\n" not in str(exc.value)


def test_bad_adversarial_params_stop_finetune_in_one_line(project):
    root = project(**{"finetune.adversarial": "pgd", "finetune.adversarial_epsilon": 0.1})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "stages.finetune"], cwd=root, env=env, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "error: params.yaml: finetune.adversarial_alpha: 0.3 is larger than finetune.adversarial_epsilon 0.1: a pgd "
        "step must fit in the epsilon ball; lower it"]


@pytest.mark.parametrize(("sweep_params", "message"), [
    ({"adversarial": []}, "sweep.adversarial: choices must be null or a non-empty list"),
    ({"adversarial": ["fgm", "fgm"]}, "sweep.adversarial: choices must be null or a non-empty list"),
    ({"adversarial": ["fgsm"]}, "sweep.adversarial.0: Input should be 'none', 'fgm' or 'pgd'"),
    ({"adversarial_epsilon": [1.0, 0.1]}, "sweep.adversarial_epsilon: range must be null or [low, high]"),
])
def test_bad_sweep_adversarial_params_give_one_line(sweep_params, message):
    with pytest.raises(UserError) as exc:
        parse_params({"sweep": sweep_params})
    assert str(exc.value).startswith(f"params.yaml: {message}") and "\n" not in str(exc.value)


# ---- sweep ----

def test_sweep_searches_adversarial_and_apply_writes_it(project, capsys):
    root = project(**{"finetune.eval_steps": 2, "finetune.epochs": 1.0, "sweep.pruner": "none",
                      "sweep.heartbeat_interval": 1, "sweep.adversarial": ["none", "fgm"],
                      "sweep.adversarial_epsilon": [0.1, 3.0]}).resolve()
    front(root)
    url = f"sqlite:///{root / 'optuna.db'}"
    seeded = optuna.create_study(study_name="tunepipe-sweep", storage=url, direction="maximize")
    base = {"learning_rate": 1e-2, "batch_size": 16, "dropout": 0.0}
    seeded.enqueue_trial({**base, "adversarial": "fgm", "adversarial_epsilon": 2.0})
    seeded.enqueue_trial({**base, "adversarial": "none", "adversarial_epsilon": 0.5})
    cli(["sweep", "--no-repro", "--trials", "2", "--apply"])

    study = optuna.load_study(study_name="tunepipe-sweep", storage=url)
    assert [t.params["adversarial"] for t in study.trials] == ["fgm", "none"]
    assert study.user_attrs[sweep_study.SPACE_ATTR]["adversarial"] == {"choices": ["none", "fgm"]}
    assert study.user_attrs[sweep_study.SPACE_ATTR]["adversarial_epsilon"] == {"low": 0.1, "high": 3.0, "log": True}
    setup = study.user_attrs[sweep_study.SETUP_ATTR]
    assert "finetune.adversarial" not in setup and "finetune.adversarial_steps" in setup
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tunepipe"], filter_string="tags.`optuna.study` = 'tunepipe-sweep'",
                              output_format="list")
    logged = {int(r.data.tags["optuna.trial_number"]): r.data.params for r in runs}
    assert {n: (v["finetune.adversarial"], float(v["finetune.adversarial_epsilon"])) for n, v in logged.items()} == {
        0: ("fgm", 2.0), 1: ("none", 0.5)}  # what each trial trained with
    best = study.best_trial.params
    ft = load_params().finetune
    assert (ft.adversarial, ft.adversarial_epsilon) == (best["adversarial"], best["adversarial_epsilon"])
    written = yaml.safe_load((root / "reports/sweep/best_params.yaml").read_text())["finetune"]
    assert written["adversarial"] == best["adversarial"]
    capsys.readouterr()

    # The same study with another choice list is refused; epsilon searched with nothing adversarial is refused.
    for edit, message in (({"adversarial": ["fgm"]},
                           "sweep: study 'tunepipe-sweep' was created with another search space (adversarial "
                           "['none', 'fgm'] -> ['fgm'])"),
                          ({"adversarial": ["none"]}, "sweep.adversarial_epsilon: no trial trains adversarially"),
                          ({"adversarial": ["pgd"], "adversarial_epsilon": [0.1, 1.0]},
                           "sweep.adversarial_epsilon's low end 0.1 is below finetune.adversarial_alpha 0.3")):
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["sweep"].update(edit)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        with pytest.raises(SystemExit) as exc:
            cli(["sweep", "--no-repro", "--trials", "3"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    assert len(optuna.load_study(study_name="tunepipe-sweep", storage=url).trials) == 2
    assert json.loads((root / "reports/sweep/summary.json").read_text())["trials"]["complete"] == 2
