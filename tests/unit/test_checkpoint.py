import pytest
import torch

from tdm import checkpoint as ckpt


def _optimizer_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.0, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_nested_state(tmp_path):
    model, opt = _optimizer_state()
    state = {"step": 7, "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": ckpt.rng_state(),
             "note": None, "pair": (1, 2.5), "names": ["a", "b"]}
    ckpt.save_state(tmp_path / "c", state)
    back = ckpt.load_state(tmp_path / "c")
    assert back["step"] == 7 and back["note"] is None and back["pair"] == (1, 2.5) and back["names"] == ["a", "b"]
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v)
    # Optimiser state is keyed by int param index: it must load back into a fresh optimiser.
    model2, opt2 = _optimizer_state()
    opt2.load_state_dict(back["optimizer"])
    assert opt2.state_dict()["param_groups"][0]["betas"] == (0.0, 0.95)
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"])


def test_rng_state_restores_the_stream(tmp_path):
    ckpt.save_state(tmp_path / "c", {"rng": ckpt.rng_state()})
    a = torch.rand(5)
    ckpt.set_rng_state(ckpt.load_state(tmp_path / "c")["rng"])
    assert torch.equal(torch.rand(5), a)


def test_failed_write_leaves_no_checkpoint(tmp_path):
    with pytest.raises(TypeError, match="cannot checkpoint"):
        ckpt.save_state(ckpt.step_dir(tmp_path, 5), {"bad": object()})
    assert ckpt.list_checkpoints(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_latest_and_prune(tmp_path):
    for step in (5, 10, 15):
        ckpt.save_state(ckpt.step_dir(tmp_path, step), {"step": step})
    (tmp_path / ".step-0000020.crashed").mkdir()  # what a SIGKILL mid-write leaves
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000015"
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000010", "step-0000015"]
    assert not list(tmp_path.glob(".step-*"))
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        ckpt.load_state(tmp_path / "nothing")


def test_prune_keep_zero_removes_every_checkpoint(tmp_path):
    for s in (30, 40):
        ckpt.save_state(ckpt.step_dir(tmp_path, s), {"step": s})
    ckpt.prune_checkpoints(tmp_path, keep=0)
    assert ckpt.list_checkpoints(tmp_path) == []
    with pytest.raises(ValueError, match="keep"):
        ckpt.prune_checkpoints(tmp_path, keep=-1)


def test_a_damaged_newest_checkpoint_falls_back_quietly_on_stdout(tmp_path, capsys):
    for s in (1, 2):
        ckpt.save_state(ckpt.step_dir(tmp_path, s), {"step": s})
    (ckpt.step_dir(tmp_path, 2) / "state.safetensors").write_bytes(b"torn")
    path, state = ckpt.load_latest(tmp_path)
    assert state["step"] == 1
    out, err = capsys.readouterr()
    assert out == "" and "trying an older one" in err
