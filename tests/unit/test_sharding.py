"""tdm.sharding: which modules become FSDP units per family, the shard / gather round trip of the roles and
of an optimiser's state (one gloo process: FSDP2 over a world of 1 shards for real, into DTensors), the
refusals, and the shipped accelerate configs as `accelerate launch` reads them."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tdm import sharding

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def one_process(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _kwargs():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy

    return {"mesh": init_device_mesh("cpu", (1,)), "reshard_after_forward": True, "offload_policy": OffloadPolicy(),
            "mp_policy": MixedPrecisionPolicy()}


def test_units_follow_each_familys_block_lists(tiny_digits):
    sys.path.insert(0, str(REPO / "tests"))
    import tiny_models

    unet = tiny_digits.net
    units = sharding.shard_units(unet)  # registration order: down_blocks, up_blocks, then mid_block
    assert len(units) == 5 and {id(u) for u in units} == {id(u) for u in (*unet.down_blocks, unet.mid_block,
                                                                          *unet.up_blocks)}
    flux = tiny_models.build("flux").transformer
    assert sharding.shard_units(flux) == [*flux.transformer_blocks, *flux.single_transformer_blocks]
    wan = tiny_models.build("wan").transformer
    assert sharding.shard_units(wan) == list(wan.blocks) and len(wan.blocks) > 0


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_roles_shard_compute_the_same_and_gather_back(one_process, teacher_dir, mode):
    from torch.distributed.fsdp import FSDPModule

    from tdm.backbones import load_backbone
    from tdm.roles import Roles

    roles = Roles(load_backbone(teacher_dir), mode, lora_rank=4, k_max=2)
    with torch.no_grad():  # non-zero adapters / K embedding, so the student differs from the teacher
        for p in roles.parameters("student"):
            p.add_(0.01 * torch.randn_like(p))
    cond = roles.backbone.encode_prompts(["a handwritten digit two", "a handwritten digit five"])
    x, t, k = torch.randn(2, 1, 8, 8), torch.tensor([500, 900]), torch.tensor([1, 2])
    before = {r: roles.x0_eps(r, x, t, cond, k if r != "teacher" else None)[0] for r in ("teacher", "student")}
    weights = roles.state_dict("student")
    plain_class = type(roles.nets["student"])

    roles.shard(**_kwargs())
    for net in {id(n): n for n in roles.nets.values()}.values():
        assert isinstance(net, FSDPModule)
        assert all(isinstance(u, FSDPModule) for u in sharding.shard_units(net))
    assert isinstance(roles.k_embeddings["student"], FSDPModule)
    assert all(sharding.is_sharded(p) for r in ("student", "fake") for p in roles.parameters(r))
    for r, out in before.items():
        torch.testing.assert_close(roles.x0_eps(r, x, t, cond, k if r != "teacher" else None)[0], out)

    roles.gather(keep=True)
    assert type(roles.nets["student"]) is plain_class and roles.backbone.net is roles.nets["teacher"]
    assert not any(sharding.is_sharded(p) for p in roles.nets["student"].parameters())
    for name, tensor in roles.state_dict("student").items():
        assert torch.equal(tensor, weights[name]), name
    torch.testing.assert_close(roles.x0_eps("student", x, t, cond, k)[0], before["student"])
    merged = roles.merged_net("student")  # what save_student writes, from the gathered roles
    assert not any(sharding.is_sharded(p) for p in merged.parameters())


def test_optimizer_state_round_trip(one_process):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    fully_shard(net, **_kwargs())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    full = sharding.gather_optimizer_state(opt, keep=True)
    assert all(not sharding.is_sharded(v) for s in full["state"].values() for v in s.values())
    assert full["state"][0]["exp_avg"].shape == (5, 3)
    fresh = torch.optim.AdamW(net.parameters(), lr=1e-2)
    fresh.load_state_dict(sharding.shard_optimizer_state(fresh, full))
    for i, s in opt.state_dict()["state"].items():
        loaded = fresh.state_dict()["state"][i]
        assert sharding.is_sharded(loaded["exp_avg"])
        assert torch.equal(loaded["exp_avg"].full_tensor(), s["exp_avg"].full_tensor())
        assert torch.equal(loaded["step"], s["step"])


def test_global_norm_and_clip_match_torch_on_plain_tensors(one_process):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    plain = nn.Linear(4, 6)
    sharded = nn.Linear(4, 6)
    sharded.load_state_dict(plain.state_dict())
    fully_shard(sharded, **_kwargs())
    x = torch.randn(3, 4)
    plain(x).sum().backward(), sharded(x).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
    got = sharding.clip_grad_norm(list(sharded.parameters()), 0.1)
    assert not sharding.is_sharded(got) and torch.allclose(got, expected)
    for p, q in zip(plain.parameters(), sharded.parameters()):
        torch.testing.assert_close(q.grad.full_tensor(), p.grad)


def test_fsdp_refuses_untested_switches(teacher_dir, tmp_path):
    from conftest import PARAMS
    from tdm import config
    from tdm.distill import TDMTrainer

    for override, key in (("distill.compile=true", "distill.compile"),
                          ("distill.mixed_precision=fp16", "distill.mixed_precision"),
                          ("distill.channels_last=true", "distill.channels_last")):
        cfg = config.load(PARAMS, [f"distill.teacher={teacher_dir}", override])
        with pytest.raises(ValueError, match=key):
            TDMTrainer.check_fsdp(cfg)
    TDMTrainer.check_fsdp(config.load(PARAMS, [f"distill.teacher={teacher_dir}", "distill.mixed_precision=bf16"]))


@pytest.mark.parametrize("name, fsdp", [("fsdp", True), ("ddp", False)])
def test_shipped_accelerate_configs(name, fsdp):
    """What `accelerate launch --config_file configs/accelerate/<name>.yaml` gives the processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / f"configs/accelerate/{name}.yaml"),
                                               "--num_processes", "2", "-m", "tdm.cli", "distill"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env.get("ACCELERATE_USE_FSDP", "false") == ("true" if fsdp else "false")
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # tdm's distill.mixed_precision decides
    if fsdp:
        assert env["FSDP_VERSION"] == "2" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
        assert env["FSDP_AUTO_WRAP_POLICY"] == "NO_WRAP"  # tdm wraps per block itself
