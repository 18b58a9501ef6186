"""Multi-GPU config of the synthesis bundle, run as 2 CPU processes on the gloo backend (torchrun).

- the DDP objectives built by ``configs/multi_gpu_train.yaml`` give, after one CycleGAN iteration, exactly the
  gradients of a single process on the same global batch (generators and critics, gradient penalty included:
  the single-process reference averages per-sample penalties with the same interpolation draws);
- ``torchrun --nproc_per_node 2 -m monai.bundle run training`` with the merged configs trains on the phantom:
  both ranks step, hold identical weights, losses are finite, and only rank 0 writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SYN = REPO / "bundles" / "cmb_synthesis" / "configs"
DET = REPO / "bundles" / "cmb_detection" / "configs"
# handlers that write files or console output; CheckpointSaver is not among them: Ignite's Checkpoint saves on
# rank 0 only by itself (and its setup is collective, so it must exist on every rank)
WRITERS = {
    "StatsHandler",
    "TensorBoardStatsHandler",
    "ignite.handlers.ProgressBar",
    "cmb_synthesis.training.handlers.ExportNetworks",
    "cmb_synthesis.training.handlers.SynthesisImageGrid",
    "cmb_synthesis.training.handlers.MetricsJSONWriter",
}


# Run inside the torchrun-launched bundle (appended to its `training` steps): builds the CycleGAN trainer from the
# bundle's configs on a fixed synthetic batch and runs one iteration, (a) with train.yaml + multi_gpu_train.yaml on this rank's half of the batch (DDP), and (b) as
# single-process references from train.yaml alone (no DDP): rank 0 on the whole batch (no penalty) and each
# rank on its own sample (penalty on). Saves the networks' gradients. The learning rate is 0 so that the
# generator step sees the same critics in both runs (Adam's first step is lr * sign(grad): it would turn
# float round-off into lr-sized differences).
GRADCHECK = r"""
import os, torch
from monai.bundle import ConfigParser
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
g = torch.Generator().manual_seed(1)
N, S = 2, (16, 16, 16)
full = {k: torch.rand((N, 1, *S), generator=g) for k in ("x_h", "x_p", "x_p2")}
# lesion masks with the same voxel count in every sample: L_AM is normalised by the batch's count of brain
# voxels outside lesions, which DDP takes per rank (equal to the global ratio only for equal counts)
for k in ("y_hp", "y_p", "y_p2"):  # y_p2: the mask of x_p2 (mask-conditioned critics)
    m = (torch.rand((1, 1, *S), generator=g) > 0.9).float()
    full[k] = torch.cat([m, m.roll(shifts=(5, 3, 7), dims=(2, 3, 4))])
full.update({k: torch.ones((N, 1, *S)) for k in ("brainmask_h", "brainmask_p")})

def step(cfgs, lambda_gp, batch, eps_seed, where):
    p = ConfigParser()
    p.read_config(cfgs)
    # the training run's bundle root and datalist: the default ones would generate the phantom cohort into the
    # repository's bundle (and write TensorBoard runs there)
    p.update(where)
    p["imports"] = [i for i in p["imports"] if "phantom" not in i]
    for k, v in dict(device="$torch.device('cpu')", backend="gloo", g_channels=4, g_res_blocks=1, g_output="sigmoid",
                     d_channels=4, d_layers=2, n_critic=1, lambda_gp=lambda_gp, lr=0.0, max_epochs=1, epoch_length=1,
                     # batch-mean profile matching is per rank under DDP (like unsynchronised BatchNorm): its
                     # gradient is not the single process's on the global batch, so it is left out of this check
                     lambda_profile_lesion=0.0, seed=0,
                     # contrast codes: each process draws its own random ranks for the painted lesions, so a
                     # rank's half of the batch is not painted as in the single process; binary masks here
                     contrast_code=False).items():
        p[k] = v
    p["train#trainer#train_data_loader"] = "$[None]"  # replaced by the synthetic batch below
    p["initialize"] = [e for e in p["initialize"] if "makedirs" not in e]  # no bundle folders
    p.parse()
    p.get_parsed_content("initialize")
    trainer = p.get_parsed_content("train#trainer")
    trainer.data_loader = [batch]
    torch.manual_seed(eps_seed)  # the penalty's interpolation draws
    trainer.run()
    nets = {n: p.get_parsed_content(n) for n in ("G_HP", "G_PH", "D_P", "D_H")}
    grads = {f"{n}.{k}": q.grad.detach().clone() for n, net in nets.items() for k, q in net.named_parameters() if q.grad is not None}
    return {"grads": grads, "output": trainer.state.output, "ddp": type(trainer.critic_objective_P).__name__}

def run(train_yaml, multi_yaml, out, where):
    mine = {k: v[rank::world] for k, v in full.items()}
    res = {"world": world}
    for gp in (0.0, 10.0):
        res[f"ddp{gp:g}"] = step([train_yaml, multi_yaml], gp, mine, 7 + rank, where)
    if rank == 0:
        res["single0"] = step([train_yaml], 0.0, full, 7, where)
    res["single10"] = step([train_yaml], 10.0, {k: v[rank:rank + 1] for k, v in full.items()}, 7 + rank, where)
    torch.save(res, f"{out}_rank{rank}.pt")
"""


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


@pytest.mark.parametrize("configs", [SYN, DET], ids=["cmb_synthesis", "cmb_detection"])
def test_multi_gpu_config_gates_every_writer_to_rank0(configs):
    """Every handler that writes files or logs is disabled on ranks > 0 (catches a reordering of train.yaml);
    checkpoint loading, checkpoint saving (Ignite: rank 0) and the per-rank reseeding stay on every rank."""
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(configs / "train.yaml"), str(configs / "multi_gpu_train.yaml")])
    handlers = list(p["train#handlers"]) + list(p["validate#evaluator#val_handlers"])
    assert handlers
    for h in handlers:
        gated = h.get("_disabled_") == "$not @is_rank0"
        assert gated == (h["_target_"] in WRITERS), f"{h['_target_']}: rank-0 gating is {gated}"
    targets = [h["_target_"] for h in p["train#handlers"]]
    assert {"CheckpointLoader", "CheckpointSaver", "cmb_synthesis.training.resume.EpochReseed"} <= set(targets)
    assert "Distributed" in p[p["train#dataloader#sampler"][1:]]["_target_"]
    assert p["train#dataloader#batch_size"] == "$max(1, @batch_size // @world_size)" or (
        p["train#dataloader#batch_size"] == "@per_rank_batch_size"
    )
    assert p["initialize"][0] == "$cmb_synthesis.bundle_utils.command_line()"  # argument checks before any work
    assert "init_process_group" in p["initialize"][1] and "destroy_process_group" in p["finalize"][0]
    # device from LOCAL_RANK: cuda:<local rank> with nccl, cpu with the gloo override
    for backend, expected in (("nccl", torch.device("cuda:1")), ("gloo", torch.device("cpu"))):
        q = ConfigParser()
        q.read_config([str(configs / "train.yaml"), str(configs / "multi_gpu_train.yaml")])
        q["imports"] = ["$import os", "$import torch"]
        q["backend"], q["local_rank"] = backend, 1
        assert q.get_parsed_content("device") == expected
        assert q.get_parsed_content("ddp_device_ids") == ([expected] if backend == "nccl" else None)


DUMP_HANDLER = r'''
import os, torch
from ignite.engine import Events

class DumpRank:
    """At COMPLETED, save this rank's iteration count, last losses and parameters."""
    def __init__(self, path, networks):
        self.path, self.networks = path, networks
    def attach(self, engine):
        engine.add_event_handler(Events.COMPLETED, self)
    def __call__(self, engine):
        rank = int(os.environ.get("RANK", 0))
        params = {f"{n}.{k}": v.detach().clone() for n, net in self.networks.items() for k, v in net.state_dict().items()}
        out = engine.state.output
        out = out[0] if isinstance(out, list) else out  # SupervisedTrainer: decollated items
        out = {str(k): float(v) for k, v in out.items() if isinstance(v, (int, float)) or k == "loss"}
        torch.save({"iteration": engine.state.iteration, "output": out, "params": params,
                    "world": torch.distributed.get_world_size()}, f"{self.path}_rank{rank}.pt")
'''

TINY_DDP = """
backend: gloo
patch_size: [32, 32, 16]
batch_size: 2
epoch_length: 2
max_epochs: 2
val_interval: 2
val_patches_per_volume: 1
val_shape_repeats: 1
image_interval: 1
g_channels: 2
g_res_blocks: 1
d_channels: 2
n_critic: 1
+imports: ["$import dumprank", "$import gradcheck"]
+train#handlers:
  - _target_: dumprank.DumpRank
    path: "$@ckpt_dir + '/../dump'"
    networks: {G_HP: "@G_HP", G_PH: "@G_PH", D_P: "@D_P", D_H: "@D_H"}
# after training, in the same processes: the gradient equivalence check
+training: ["$gradcheck.run(TRAIN_YAML, MULTI_YAML, @ckpt_dir + '/../grad', {'bundle_root': @bundle_root + '/grad_bundle', 'datalist': @datalist, 'dataset_dir': @dataset_dir})"]
"""


@pytest.mark.e2e
def test_torchrun_synthesis_training_on_two_gloo_ranks(tiny_cohort, tmp_path):
    """The bundle trains on 2 ranks (replicas identical, rank-0 writes), and the DDP objectives of the config
    give exactly the single-process gradients on the same global batch (penalty off and on)."""
    (tmp_path / "dumprank.py").write_text(DUMP_HANDLER)
    (tmp_path / "gradcheck.py").write_text(GRADCHECK)
    tiny = TINY_DDP.replace("TRAIN_YAML", repr(str(SYN / "train.yaml"))).replace("MULTI_YAML", repr(str(SYN / "multi_gpu_train.yaml")))
    (tmp_path / "tiny_ddp.yaml").write_text(tiny)
    root = tmp_path / "bundle"
    files = [str(SYN / "train.yaml"), str(SYN / "multi_gpu_train.yaml"), str(tmp_path / "tiny_ddp.yaml")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "monai.bundle", "run", "training", "--config_file", repr(files)]
    cmd += ["--bundle_root", str(root), "--datalist", tiny_cohort, "--dataset_dir", str(Path(tiny_cohort).parent)]
    env = dict(_env(), PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, encoding="utf-8", errors="replace", timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]

    d0 = torch.load(root / "dump_rank0.pt", weights_only=True)
    d1 = torch.load(root / "dump_rank1.pt", weights_only=True)
    assert d0["world"] == d1["world"] == 2
    assert d0["iteration"] == d1["iteration"] == 4  # both ranks stepped 2 epochs x 2 iterations
    for d in (d0, d1):
        assert all(torch.isfinite(torch.tensor(v)) for v in d["output"].values()), d["output"]
    for k, v in d0["params"].items():
        torch.testing.assert_close(d1["params"][k], v, rtol=0, atol=0)  # DDP kept the replicas identical

    models = root / "models"
    ckpts = sorted(p.name for p in models.glob("checkpoint*.pt"))
    assert ckpts, sorted(p.name for p in models.iterdir())
    state = torch.load(models / ckpts[-1], weights_only=True)
    assert state["trainer"]["iteration"] == 4
    assert not any(k.startswith("module.") for k in state["G_HP"])  # plain keys: loads without DDP
    for k, v in state["G_HP"].items():  # the online weights are checkpointed as trained
        torch.testing.assert_close(v, d0["params"][f"G_HP.{k}"])
    exported = torch.load(models / "G_HP.pt", weights_only=True)  # the export is the moving average (EMA)
    for k, v in exported.items():
        torch.testing.assert_close(v, state["G_HP_ema"][k])
    assert (models / "metrics.json").is_file() and (models / "lesion_bank.npz").is_file()
    # rank 0 alone logs: one writer per TensorBoard handler (train stats, validation stats, image grid)
    events = list((root / "runs").rglob("events.out.tfevents.*"))
    assert 1 <= len(events) <= 3, events

    r0 = torch.load(root / "grad_rank0.pt", weights_only=True)
    r1 = torch.load(root / "grad_rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    assert r0["ddp0"]["ddp"] == "DistributedDataParallel" and r0["single0"]["ddp"] == "CriticObjective"

    # no penalty: every gradient of the 2-rank run equals the single process's on the whole global batch
    ref = r0["single0"]["grads"]
    assert set(r0["ddp0"]["grads"]) == set(ref) and len(ref) > 20
    assert {k.split(".")[0] for k in ref} == {"G_HP", "G_PH", "D_P", "D_H"}
    for k, v in ref.items():
        torch.testing.assert_close(r0["ddp0"]["grads"][k], r1["ddp0"]["grads"][k], rtol=0, atol=0)  # synchronised
        torch.testing.assert_close(r0["ddp0"]["grads"][k], v, rtol=1e-4, atol=1e-7)

    # penalty on: each critic's gradient (WGAN + lambda_gp * GP, double backward) is the mean of the
    # single-process per-sample gradients with the same interpolation draws, identical on both ranks
    out = r0["ddp10"]["output"]
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values()) and out["GP"] > 0
    s0, s1 = r0["single10"]["grads"], r1["single10"]["grads"]
    d_keys = [k for k in s0 if k.startswith("D_")]
    assert len(d_keys) >= 4
    for k in d_keys:
        torch.testing.assert_close(r0["ddp10"]["grads"][k], r1["ddp10"]["grads"][k], rtol=0, atol=0)
        torch.testing.assert_close(r0["ddp10"]["grads"][k], 0.5 * (s0[k] + s1[k]), rtol=1e-4, atol=1e-7)




TINY_DDP_DETECTION = """
backend: gloo
batch_size: 4
epoch_length: 2
max_epochs: 1
channels: [4, 8]
strides: [2, 2]
num_res_units: 1
+imports: ["$import dumprank"]
+train#handlers:
  - _target_: dumprank.DumpRank
    path: "$@ckpt_dir + '/../dump'"
    networks: {network: "@network"}
"""


@pytest.mark.e2e
def test_torchrun_detection_training_on_two_gloo_ranks(tiny_cohort, tmp_path):
    (tmp_path / "dumprank.py").write_text(DUMP_HANDLER)
    (tmp_path / "tiny_ddp.yaml").write_text(TINY_DDP_DETECTION)
    root = tmp_path / "bundle"
    files = [str(DET / "train.yaml"), str(DET / "multi_gpu_train.yaml"), str(tmp_path / "tiny_ddp.yaml")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "monai.bundle", "run", "training", "--config_file", repr(files)]
    cmd += ["--bundle_root", str(root), "--datalist", tiny_cohort, "--dataset_dir", str(Path(tiny_cohort).parent)]
    env = dict(_env(), PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, encoding="utf-8", errors="replace", timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    d0 = torch.load(root / "dump_rank0.pt", weights_only=True)
    d1 = torch.load(root / "dump_rank1.pt", weights_only=True)
    assert d0["world"] == d1["world"] == 2 and d0["iteration"] == d1["iteration"] == 2
    assert all(torch.isfinite(torch.tensor(d["output"]["loss"])) for d in (d0, d1)), (d0["output"], d1["output"])
    for k, v in d0["params"].items():
        torch.testing.assert_close(d1["params"][k], v, rtol=0, atol=0)
    best = torch.load(root / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in best)  # saved unwrapped: loads without DDP
    assert len(list((root / "runs").rglob("events.out.tfevents.*"))) <= 2  # rank 0's train + validation writers
