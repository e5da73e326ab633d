"""Distillation: the loss, the teacher's out-of-fold probabilities joined to training rows by id (a member
folder or an ensemble spec), the config section, and one real Ray Train run of a student."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from app import storage
from app.batching import swap_soft_labels
from app.config import ConfigError, load_config
from app.distillation import (
    TEACHER_COLUMNS,
    Teacher,
    TeacherError,
    attach_teacher,
    distillation_loss,
    load_teacher,
    soft_label_loss,
)
from app.ensemble import EnsembleMember, EnsembleReport, EnsembleSpec, combine, save_spec
from app.formatting import SWAPPED_LABEL
from app.members import LOGIT_COLUMNS, OOF_FORMAT
from app.inference import Predictor
from app.metrics import softmax
from app.students import train_student
from app.training import load_training_rows, run_directory, split_train_valid, with_teacher

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def random_batch(seed: int = 0, rows: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, 3, generator=generator) * 2
    labels = torch.randint(0, 3, (rows,), generator=generator)
    teacher = torch.softmax(torch.randn(rows, 3, generator=generator) * 2, dim=-1)
    return logits, labels, teacher


# --- the loss -----------------------------------------------------------------------------------------------

def test_alpha_zero_is_the_cross_entropy():
    logits, labels, teacher = random_batch()
    loss = distillation_loss(logits, labels, teacher, temperature=3.0, alpha=0.0)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


def test_the_soft_term_is_zero_when_the_student_matches_the_teacher():
    _, labels, teacher = random_batch()
    logits = torch.log(teacher) + 5.0  # the same distribution, shifted logits
    for temperature in (1.0, 2.5):
        assert soft_label_loss(logits, teacher, temperature).item() == pytest.approx(0.0, abs=1e-6)
    hard = torch.nn.functional.cross_entropy(logits, labels)
    mixed = distillation_loss(logits, labels, teacher, temperature=2.0, alpha=0.7)
    assert mixed.item() == pytest.approx(0.3 * hard.item(), rel=1e-5)


def test_the_soft_term_is_t_squared_times_the_kl_of_the_softened_distributions():
    logits, _, teacher = random_batch(seed=1)
    temperature = 3.0
    student_t = softmax(logits.numpy() / temperature)
    teacher_t = softmax(np.log(teacher.numpy()) / temperature)
    expected = temperature**2 * np.mean(np.sum(teacher_t * np.log(teacher_t / student_t), axis=1))
    assert soft_label_loss(logits, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)
    # the softened teacher is flatter than the teacher itself
    assert np.all(teacher_t.max(axis=1) < teacher.numpy().max(axis=1))


def test_t_squared_keeps_the_gradient_at_the_size_of_the_logit_gap():
    """d(soft term)/dz = T * (softmax(z/T) - teacher_T) / B: without T^2 it would shrink as 1/T."""
    logits, _, teacher = random_batch(seed=2)
    temperature = 4.0
    logits.requires_grad_(True)
    soft_label_loss(logits, teacher, temperature).backward()
    teacher_t = torch.softmax(torch.log(teacher) / temperature, dim=-1)
    expected = temperature * (torch.softmax(logits.detach() / temperature, dim=-1) - teacher_t) / len(logits)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-4, atol=1e-6)


def test_alpha_one_ignores_the_labels():
    logits, labels, teacher = random_batch(seed=3)
    other = (labels + 1) % 3
    assert distillation_loss(logits, labels, teacher, 2.0, 1.0).item() == pytest.approx(
        distillation_loss(logits, other, teacher, 2.0, 1.0).item())


def test_a_given_hard_loss_replaces_the_cross_entropy():
    logits, labels, teacher = random_batch(seed=4)
    hard = torch.tensor(10.0)
    loss = distillation_loss(logits, labels, teacher, 2.0, 0.25, hard_loss=hard)
    assert loss.item() == pytest.approx(0.25 * soft_label_loss(logits, teacher, 2.0).item() + 0.75 * 10.0, rel=1e-6)


def test_swapped_soft_labels_exchange_a_and_b_like_the_labels():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    swapped = swap_soft_labels(probs)
    np.testing.assert_array_equal(swapped, [[0.2, 0.7, 0.1], [0.3, 0.1, 0.6]])
    np.testing.assert_array_equal(swap_soft_labels(swapped), probs)
    # the most probable class of a swapped row is the swapped label of the row's most probable class
    assert [SWAPPED_LABEL[label] for label in probs.argmax(axis=1)] == swapped.argmax(axis=1).tolist()


# --- the teacher ----------------------------------------------------------------------------------------------

def write_member(directory: Path, name: str, ids: list[str], labels: np.ndarray, logits: np.ndarray,
                 folds: np.ndarray | None = None) -> str:
    """A member folder as jobs/cv.py writes it (member.json + oof.parquet) with the given out-of-fold logits."""
    directory.mkdir(parents=True, exist_ok=True)
    oof = pd.DataFrame(logits, columns=list(LOGIT_COLUMNS))
    oof.insert(0, "fold", np.arange(len(ids)) % 2 if folds is None else folds)
    oof.insert(0, "id", ids)
    oof["label"] = labels
    oof.to_parquet(directory / "oof.parquet", index=False)
    meta = {"format": OOF_FORMAT, "member": name, "folds": [{"fold": 0, "checkpoint": str(directory / "f0")},
                                                          {"fold": 1, "checkpoint": str(directory / "f1")}]}
    (directory / "member.json").write_text(json.dumps(meta))
    return str(directory)


def test_a_member_teacher_gives_each_training_row_its_out_of_fold_probabilities(tmp_path):
    ids, labels = ["r1", "r2", "r3"], np.array([0, 1, 2])
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.1, 0.2, 3.0]])
    teacher = load_teacher(write_member(tmp_path / "m", "m", ids, labels, logits))
    frame = pd.DataFrame({"id": ["r3", "r1"], "label": [2, 0]})  # another order, a subset
    joined = attach_teacher(frame, teacher)
    np.testing.assert_allclose(joined[list(TEACHER_COLUMNS)].to_numpy(), softmax(logits[[2, 0]]), rtol=1e-6)
    assert list(joined["id"]) == ["r3", "r1"] and TEACHER_COLUMNS[0] not in frame  # a copy


def test_a_training_row_without_a_teacher_prediction_is_named(tmp_path):
    teacher = Teacher("runs/t", np.array(["r1", "r2"]), np.full((2, 3), 1 / 3), np.array([0, 1]))
    frame = pd.DataFrame({"id": ["r1", "r9", "r2", "r8"], "label": [0, 1, 1, 2]})
    with pytest.raises(TeacherError, match=r"training row id='r9' has no prediction from the teacher runs/t "
                                           r"\(2 of 4 training rows have none\)"):
        attach_teacher(frame, teacher)


def test_a_teacher_with_other_labels_for_the_same_ids_is_refused():
    teacher = Teacher("runs/t", np.array(["r1", "r2"]), np.full((2, 3), 1 / 3), np.array([0, 1]))
    with pytest.raises(TeacherError, match=r"training row id='r2' has label 2 but the teacher runs/t recorded 1"):
        attach_teacher(pd.DataFrame({"id": ["r1", "r2"], "label": [0, 2]}), teacher)


def test_an_ensemble_teacher_combines_its_members_out_of_fold_logits(tmp_path):
    rng = np.random.default_rng(0)
    ids, labels = [f"r{i}" for i in range(8)], rng.integers(0, 3, 8)
    sharp, flat = rng.normal(0, 2, (8, 3)), rng.normal(0, 0.5, (8, 3))
    directories = {"sharp": write_member(tmp_path / "sharp", "sharp", ids, labels, sharp),
                   "flat": write_member(tmp_path / "flat", "flat", ids, labels, flat)}
    # as jobs/ensemble.py writes it: each member's fold models share its weight and its temperature
    fold_models = [EnsembleMember(name=f"{name}/fold{k}", checkpoint=f"{name}-fold{k}", weight=weight / 2,
                                  temperature=temperature)
                   for name, weight, temperature in (("sharp", 0.75, 1.5), ("flat", 0.25, 0.8)) for k in (0, 1)]
    report = EnsembleReport(n_rows=8, member_log_loss={m.name: 1.0 for m in fold_models}, ensemble_log_loss=1.0)
    spec = EnsembleSpec(members=tuple(fold_models), mode="logit", member_dirs=directories, report=report)
    path = save_spec(spec, tmp_path / "ensemble.json")

    teacher = load_teacher(str(path))
    expected = combine([sharp, flat], [0.75, 0.25], "logit", [1.5, 0.8])
    np.testing.assert_allclose(teacher.probs_for(ids), expected, rtol=1e-9)
    assert not np.allclose(expected, softmax(sharp))  # the combination is not just one member

    with pytest.raises(ValueError, match=r"member_dirs: must have one folder per member \['flat', 'sharp'\]"):
        EnsembleSpec(members=tuple(fold_models), mode="logit", member_dirs={"sharp": directories["sharp"]},
                     report=report)
    save_spec(spec.model_copy(update={"member_dirs": None}), tmp_path / "old.json")
    with pytest.raises(TeacherError, match=r"does not record its members' out-of-fold folders.*jobs.ensemble"):
        load_teacher(str(tmp_path / "old.json"))


def test_a_member_folder_and_a_spec_on_s3_are_teachers_as_local_ones_are(tmp_path, s3):
    """jobs/cv.py and jobs/ensemble.py with s3:// outputs: the teacher is read from there."""
    rng = np.random.default_rng(1)
    ids, labels = [f"r{i}" for i in range(6)], rng.integers(0, 3, 6)
    logits = {name: rng.normal(0, 1.5, (6, 3)) for name in ("a", "b")}
    root = s3()
    directories = {name: storage.join(root, name) for name in logits}
    for name, member_logits in logits.items():
        storage.upload_dir(write_member(tmp_path / name, name, ids, labels, member_logits), directories[name])
    teacher = load_teacher(directories["a"])
    assert teacher.source == directories["a"] and teacher.labels.tolist() == labels.tolist()
    np.testing.assert_allclose(teacher.probs_for(ids), softmax(logits["a"]), rtol=1e-9)

    fold_models = [EnsembleMember(name=f"{name}/fold{k}", checkpoint=f"{directories[name]}-fold{k}", weight=0.25,
                                  temperature=1.2) for name in logits for k in (0, 1)]
    report = EnsembleReport(n_rows=6, member_log_loss={m.name: 1.0 for m in fold_models}, ensemble_log_loss=1.0)
    spec = EnsembleSpec(members=tuple(fold_models), mode="prob", member_dirs=directories, report=report)
    teacher = load_teacher(save_spec(spec, storage.join(root, "ensemble", "ensemble.json")))
    np.testing.assert_allclose(teacher.probs_for(ids), combine(list(logits.values()), [0.5, 0.5], "prob", [1.2, 1.2]),
                               rtol=1e-9)
    with pytest.raises(TeacherError, match=r"neither a member folder .* nor an ensemble spec"):
        load_teacher(storage.join(root, "missing"))


def test_a_teacher_path_that_is_neither_a_member_nor_a_spec_is_refused(tmp_path):
    with pytest.raises(TeacherError, match=r"neither a member folder .* nor an ensemble spec"):
        load_teacher(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no member.json"):
        load_teacher(str(tmp_path))


# --- config -----------------------------------------------------------------------------------------------------

def test_the_distill_section_is_validated_with_its_dotted_keys():
    config = load_config(None, ["distill.teacher=runs/deberta", "distill.alpha=0.8", "distill.temperature=3"])
    assert (config.distill.teacher, config.distill.alpha, config.distill.temperature) == ("runs/deberta", 0.8, 3.0)
    assert load_config().distill.teacher is None
    with pytest.raises(ConfigError, match=r"distill\.alpha"):
        load_config(None, ["distill.alpha=1.5"])
    with pytest.raises(ConfigError, match=r"distill\.temperature"):
        load_config(None, ["distill.temperature=0"])
    with pytest.raises(ConfigError, match=r"distill\.teacher is empty"):
        load_config(None, ["distill.teacher=' '"])
    with pytest.raises(ConfigError, match=r"cannot take distill\.teacher"):
        load_config(None, ["model.kind=tfidf_xgb", "distill.teacher=runs/deberta"])


# --- a real student ---------------------------------------------------------------------------------------------

def test_a_student_trains_on_the_teacher_alone(ray_session, tmp_path):
    """alpha=1: only the teacher's probabilities reach the loss. The teacher puts 0.8 on each row's true class,
    0.1 on the others; at T=2 a near-uniform student starts at T^2 * KL = 0.53, where cross-entropy would be
    about ln 3 = 1.10. (A run this small does not reliably beat uniform guessing on validation: 1.09-1.10.)"""
    config = load_config(TINY, {"run.storage_path": str(tmp_path), "run.name": "student", "run.keep_checkpoints": 1,
                                "data.builtin_rows": 200, "format.max_length": 64, "predict.precision": "fp32",
                                "distill.teacher": str(tmp_path / "teacher"), "distill.alpha": 1.0,
                                "distill.temperature": 2.0})
    frame, _ = load_training_rows(config, run_directory(config))  # writes the built-in data
    labels = frame["label"].to_numpy()
    write_member(tmp_path / "teacher", "teacher", frame["id"].astype(str).tolist(), labels,
                 np.log(np.where(np.eye(3)[labels] == 1, 0.8, 0.1)))

    report = train_student(config)

    result = json.loads((tmp_path / "student" / "summary.json").read_text())
    epochs = [row for row in result["history"] if "train_loss" in row]
    assert len(epochs) == 2 and all(0.3 < row["train_loss"] < 0.7 for row in epochs), epochs  # the KL term
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    _, valid = split_train_valid(frame, config)
    assert result["best_metrics"]["valid_rows"] == len(valid)  # validation: the hard labels of the whole fold
    assert report["student"]["log_loss"] == pytest.approx(result["best_metrics"]["valid_log_loss"])
    assert report["teacher"]["log_loss"] == pytest.approx(-np.log(0.8), rel=1e-6)  # on the same validation rows
    texts = (list(valid["prompt"]), list(valid["response_a"]), list(valid["response_b"]))
    probs = Predictor(report["student"]["best_checkpoint"], precision="fp32").predict(*texts)
    assert probs.shape == (len(valid), 3) and np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    arena = json.loads((Path(report["student"]["best_checkpoint"]) / "arena.json").read_text())
    assert arena["config"]["distill"]["teacher"] == str(tmp_path / "teacher")


def test_fit_stops_on_a_training_row_the_teacher_did_not_score(tmp_path):
    """`with_teacher` is what `fit` runs on the training rows before any Ray work."""
    config = load_config(TINY, {"run.storage_path": str(tmp_path), "run.name": "orphan", "data.builtin_rows": 200,
                                "distill.teacher": str(tmp_path / "teacher")})
    frame, _ = load_training_rows(config, run_directory(config))
    train, _ = split_train_valid(frame, config)
    orphan = train["id"].iloc[3]
    scored = frame[frame["id"] != orphan]
    write_member(tmp_path / "teacher", "teacher", scored["id"].astype(str).tolist(), scored["label"].to_numpy(),
                 np.zeros((len(scored), 3)))
    with pytest.raises(TeacherError, match=rf"training row id='{orphan}' has no prediction .* \(1 of {len(train)} "):
        with_teacher(train, config)
    assert with_teacher(train[train["id"] != orphan], config)[list(TEACHER_COLUMNS)].to_numpy() == pytest.approx(1 / 3)
