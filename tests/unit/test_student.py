"""The student contract (tdm/student.py): the record round-trips, old sidecar files still load, bad files fail
naming the key, and a loaded K-aware student conditions on K exactly as its training role did."""
import json

import pytest
import torch

from tdm.roles import Roles
from tdm.sampler import make_noise, sample_student, student_sample
from tdm.student import (K_EMBEDDING_FILE, RECORD_FILE, Student, StudentRecord, k_conditioning, load_k_embedding,
                         load_student)


def _save(backbone, folder, record, embedding=None):
    backbone.save(folder, extra_files=record.files(embedding))
    return folder


def test_record_round_trips(tiny_digits, tmp_path):
    record = StudentRecord(family="digits", k=2, total_steps=900, unify=True, k_choices=(1, 2, 4), guidance=2.0,
                           mode="lora", teacher="outputs/teacher_ft/model", lora_scale=0.5)
    emb = torch.nn.Embedding(5, 8)
    folder = _save(tiny_digits, tmp_path / "s", record, emb)
    assert StudentRecord.load(folder) == record
    torch.testing.assert_close(load_k_embedding(folder).weight, emb.weight.detach())
    assert record.sampling_ks == (1, 2, 4) and record.timesteps(4).tolist() == [899, 674, 449, 224]
    assert StudentRecord(family="digits", k=4, total_steps=900).sampling_ks == (4,)


def test_a_per_step_guidance_schedule_is_recorded_and_shown(tiny_digits, tmp_path):
    record = StudentRecord(family="digits", k=4, total_steps=900, guidance=1.0, guidance_schedule=[3, 1, 1, 1])
    folder = _save(tiny_digits, tmp_path / "s", record)
    loaded = StudentRecord.load(folder)
    assert loaded == record and loaded.guidance_schedule == (3.0, 1.0, 1.0, 1.0)
    assert loaded.guidance_label == "3, 1, 1, 1 per step"
    assert StudentRecord(family="digits", k=4, total_steps=900, guidance=2.0).guidance_label == "2"
    with pytest.raises(ValueError, match="guidance_schedule: one CFG scale per step"):
        StudentRecord(family="digits", k=4, total_steps=900, guidance_schedule=(3.0, 1.0))
    with pytest.raises(ValueError, match="guidance_schedule: one CFG scale per step"):
        StudentRecord(family="digits", k=4, total_steps=900, unify=True, k_choices=(1, 2, 4),
                      guidance_schedule=(3.0, 1.0, 1.0, 1.0))


@pytest.mark.parametrize("legacy", [
    {"k": 4, "total_steps": 900},  # what early benchmarks and tests wrote
    {"k": 2, "total_steps": 900, "unify": False, "k_choices": [1, 2, 4], "guidance": 2.0, "mode": "lora",
     "teacher": "outputs/teacher_ft/model"},  # what distill wrote before the record was typed
])
def test_old_sidecar_files_still_load(tiny_digits, tmp_path, legacy):
    folder = tmp_path / "old"
    tiny_digits.save(folder, extra_files={RECORD_FILE: json.dumps(legacy)})
    record = StudentRecord.load(folder)
    assert record.family == "digits"  # read from the folder's model_index.json
    assert (record.k, record.total_steps, record.unify) == (legacy["k"], 900, False)
    assert record.guidance == legacy.get("guidance") and record.sampling_ks == (legacy["k"],)
    assert load_student(folder).record == record
    assert record.solver_order == 1  # older records sample as they always did: DDIM


@pytest.mark.parametrize("content, match", [
    ({"k": 4}, "total_steps: missing"),
    ({"k": "4", "total_steps": 900}, "k: missing or not an integer"),
    ({"k": 4, "total_steps": 900, "grid": [1]}, r"unknown key\(s\) \['grid'\]"),
    ({"k": 4, "total_steps": 900, "version": 99}, "newer than this tdm"),
    ({"k": 1000, "total_steps": 900}, "k: must be in"),
    ({"k": 4, "total_steps": 900, "mode": "half"}, "mode"),
    ({"k": 4, "total_steps": 900, "solver_order": 3}, "solver_order: must be 1"),
    ({"k": 4, "total_steps": 900, "solver_order": True}, "solver_order: must be 1"),
])
def test_bad_records_fail_naming_the_key(tiny_digits, tmp_path, content, match):
    folder = tmp_path / "bad"
    tiny_digits.save(folder, extra_files={RECORD_FILE: json.dumps(content)})
    with pytest.raises(ValueError, match=match):
        StudentRecord.load(folder)


def test_binary_or_bom_records(tiny_digits, tmp_path):
    record = StudentRecord(family="digits", k=4, total_steps=900)
    tiny_digits.save(tmp_path / "bom", extra_files={RECORD_FILE: "\ufeff" + record.to_json()})
    assert StudentRecord.load(tmp_path / "bom") == record  # what spreadsheet-era editors write
    tiny_digits.save(tmp_path / "bin", extra_files={RECORD_FILE: b"\xff\xfe\x00binary"})
    with pytest.raises(ValueError, match=r"bin/tdm_student.json: not UTF-8 text"):
        StudentRecord.load(tmp_path / "bin")


def test_missing_record_or_embedding_fails_before_loading_weights(tiny_digits, tmp_path):
    with pytest.raises(FileNotFoundError, match=RECORD_FILE):
        StudentRecord.load(tmp_path)
    unify = StudentRecord(family="digits", k=4, total_steps=900, unify=True, k_choices=(1, 4))
    with pytest.raises(ValueError, match="K embedding"):
        unify.files(None)
    folder = tmp_path / "s"
    tiny_digits.save(folder, extra_files={RECORD_FILE: unify.to_json()})
    with pytest.raises(FileNotFoundError, match=K_EMBEDDING_FILE):
        load_student(folder)
    with pytest.raises(ValueError, match="family"):
        _save(tiny_digits, tmp_path / "f", StudentRecord(family="sd15", k=4, total_steps=900))
        load_student(tmp_path / "f")


def test_a_loaded_unify_student_is_conditioned_on_k_as_its_training_role(tiny_digits, tmp_path):
    """One K path: the K embedding a Roles student trains and the one a loaded student carries reach the time
    embedding the same way, so the saved student samples exactly what the role computed."""
    roles = Roles(tiny_digits, "full", k_max=4)
    with torch.no_grad():
        roles.k_embeddings["student"].weight.normal_()
    record = StudentRecord(family="digits", k=4, total_steps=900, unify=True, k_choices=(1, 2, 4))
    folder = _save(tiny_digits, tmp_path / "s", record, roles.k_embedding("student"))
    student = load_student(folder)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([899, 449])
    cond = student.backbone.encode_prompts(["a handwritten digit two"] * 2)
    for k in (1, 2, 4):
        k_cond = torch.full((2,), k)
        with torch.no_grad():
            ours = roles.x0_eps("student", x, t, cond, k_cond)[0]
            with k_conditioning(student.backbone, student.net, student.k_embedding, k_cond):
                theirs = student.backbone.predict_x0_eps(student.net, x, t, cond)[0]
        torch.testing.assert_close(theirs, ours)
    # The K condition changes the samples (so sampling without it would be a silent difference).
    noise = make_noise(2, student.backbone.sample_shape, seed=0)
    with_k = student.sample(cond, noise, 2)
    without = student_sample(student.backbone, student.net, cond, noise, record.timesteps(2))
    assert (with_k - without).abs().max() > 1e-3
    assert sample_student(student, ["a handwritten digit two"] * 2, k=2).shape == (2, 8, 8, 1)


def test_a_student_on_another_net_leaves_the_backbone_alone(tiny_digits):
    """lora-transfer samples a fused copy on the custom model's backbone: no backbone attribute changes."""
    import copy

    net = copy.deepcopy(tiny_digits.net)
    before = dict(vars(tiny_digits))
    Student(tiny_digits, net, StudentRecord(family="digits", k=2, total_steps=900))
    assert vars(tiny_digits).keys() == before.keys() and tiny_digits.net is before["net"]


def test_the_record_carries_the_grid_and_sampling_follows_it(tiny_digits, tmp_path):
    shifted = StudentRecord(family="digits", k=4, total_steps=900, shift=2.0)
    explicit = StudentRecord(family="digits", k=4, total_steps=900, explicit_timesteps=(899, 700, 500, 100))
    for record in (shifted, explicit):
        folder = _save(tiny_digits, tmp_path / str(record.shift), record)
        loaded = load_student(folder)
        assert loaded.record == record
        prompts = ["a handwritten digit three"] * 2
        noise = make_noise(2, tiny_digits.sample_shape, seed=0)
        x0 = student_sample(tiny_digits, tiny_digits.net, tiny_digits.encode_prompts(prompts), noise,
                            record.timesteps(4))
        assert torch.equal(sample_student(loaded, prompts, seed=0), tiny_digits.decode(x0))
    assert shifted.timesteps(4).tolist() == [899, 770, 599, 359]
    with pytest.raises(ValueError, match="K = 4 only"):
        explicit.check_k(2)
