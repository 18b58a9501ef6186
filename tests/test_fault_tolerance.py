"""Fault tolerance: training killed with SIGKILL mid-epoch and resumed ends where an uninterrupted run ends;
batch inference writes atomically, skips existing outputs unless asked, never writes over inputs.

The SIGKILL test runs the synthesis bundle (``python -m monai.bundle run training`` subprocesses, tiny
configuration, ``EpochReseed`` added by the override) and kills it in the middle of an epoch;
:class:`cmb_synthesis.training.resume.ResumeFromLatest` and :class:`~cmb_synthesis.training.resume.EpochReseed` are also checked
in-process on a generic MONAI trainer config.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cmb_synthesis.training.resume import EpochReseed, epoch_seed, is_complete_checkpoint, latest_checkpoint

REPO = Path(__file__).resolve().parents[1]

# A handler that stops the process at a given (epoch, iteration-in-epoch) so the parent can SIGKILL it there.
KILLPOINT = '''
import os, time
from pathlib import Path
from ignite.engine import Events

class KillPoint:
    """At ITERATION_COMPLETED of (epoch, iter_in_epoch): write ``marker`` and wait to be killed."""
    def __init__(self, marker, epoch, iteration_in_epoch, enabled=True):
        self.marker, self.epoch, self.it, self.enabled = Path(marker), int(epoch), int(iteration_in_epoch), enabled
    def attach(self, engine):
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
    def __call__(self, engine):
        in_epoch = (engine.state.iteration - 1) % engine.state.epoch_length + 1
        if self.enabled and engine.state.epoch == self.epoch and in_epoch == self.it:
            self.marker.write_text(str(os.getpid()))
            time.sleep(120)
'''

TINY_BUNDLE = """
imports: ["$import torch", "$import numpy as np", "$import monai", "$import cmb_synthesis", "$import cmb_synthesis.training.resume", "$import killpoint"]
seed: 3
max_epochs: 4
run_dir: "."
ckpt_dir: "$@run_dir + '/models'"
ckpt_path: "$cmb_synthesis.training.resume.latest_checkpoint(@ckpt_dir)"
kill_epoch: 0
device: "$torch.device('cpu')"
data: "$[{'image': np.random.RandomState(i).rand(1, 8, 8, 8).astype('float32'), 'label': np.random.RandomState(100 + i).rand(1, 8, 8, 8).astype('float32')} for i in range(6)]"
network: "$torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.PReLU(), torch.nn.Dropout(0.2), torch.nn.Conv3d(4, 1, 3, padding=1))"
optimizer: {_target_: torch.optim.Adam, params: "$@network.parameters()", lr: 0.01}
transforms:
  _target_: monai.transforms.Compose
  transforms:
    - {_target_: monai.transforms.RandFlipd, keys: [image, label], prob: 0.5, spatial_axis: 0}
    - {_target_: monai.transforms.RandGaussianNoised, keys: image, prob: 0.5, std: 0.1}
dataset: {_target_: monai.data.Dataset, data: "@data", transform: "@transforms"}
loader: {_target_: monai.data.DataLoader, dataset: "@dataset", batch_size: 2, shuffle: true, num_workers: 0}
handlers:
  - {_target_: cmb_synthesis.training.resume.EpochReseed, seed: "@seed"}
  - {_target_: killpoint.KillPoint, marker: "$@run_dir + '/killed_here'", epoch: "@kill_epoch", iteration_in_epoch: 2}
# handlers that save/restore the trainer itself are attached in `run` (the trainer cannot list them: cycle)
checkpoint_handlers:
  - _target_: CheckpointLoader
    _disabled_: "$not @ckpt_path"
    load_path: "@ckpt_path"
    load_dict: {network: "@network", optimizer: "@optimizer", trainer: "@trainer"}
  - _target_: CheckpointSaver
    save_dir: "@ckpt_dir"
    save_dict: {network: "@network", optimizer: "@optimizer", trainer: "@trainer"}
    save_interval: 1
    n_saved: 2
trainer:
  _target_: SupervisedTrainer
  device: "@device"
  max_epochs: "@max_epochs"
  train_data_loader: "@loader"
  network: "@network"
  optimizer: "@optimizer"
  loss_function: "$torch.nn.MSELoss()"
  train_handlers: "@handlers"
initialize: ["$monai.utils.set_determinism(seed=123)"]
run: ["$[h.attach(@trainer) for h in @checkpoint_handlers]", "$@trainer.run()", "$torch.save(@network.state_dict(), @run_dir + '/final.pt')",
  "$open(@run_dir + '/resumed_from.txt', 'w').write(@ckpt_path or 'None')"]
"""


def _env(tmp: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{tmp}{os.pathsep}{REPO}")


SYN_TRAIN = REPO / "bundles" / "cmb_synthesis" / "configs" / "train.yaml"
TINY_SYNTHESIS = """
device: "$torch.device('cpu')"
patch_size: [32, 32, 16]
batch_size: 2
epoch_length: 2
max_epochs: 3
val_interval: 100
image_interval: 100
g_channels: 2
g_res_blocks: 1
d_channels: 2
n_critic: 1
lr_decay_start: 1           # the learning-rate schedule's state resumes too
kill_epoch: 0
+imports: ["$import killpoint", "$import cmb_synthesis.training.resume"]
+train#handlers:
  - {_target_: cmb_synthesis.training.resume.EpochReseed, seed: "@seed"}
  - {_target_: killpoint.KillPoint, marker: "$@bundle_root + '/killed_here'", epoch: "@kill_epoch", iteration_in_epoch: 1}
"""


@pytest.mark.e2e
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tiny_cohort, tmp_path):
    """The synthesis bundle, killed with SIGKILL in epoch 3 of 3 and resumed with --resume true, ends with
    exactly the weights of an uninterrupted run (learning-rate decay included); the epoch-2 checkpoint is there
    (at most one epoch lost)."""
    (tmp_path / "killpoint.py").write_text(KILLPOINT)
    (tmp_path / "tiny.yaml").write_text(TINY_SYNTHESIS)
    files = repr([str(SYN_TRAIN), str(tmp_path / "tiny.yaml")])

    def cmd(root: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", files,
                "--bundle_root", str(root), "--datalist", tiny_cohort, *extra]  # fmt: skip

    env, ref_dir, run_dir = _env(tmp_path), tmp_path / "uninterrupted", tmp_path / "killed"
    ref = subprocess.Popen(cmd(ref_dir), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc = subprocess.Popen(
        cmd(run_dir, "--kill_epoch", "3"), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    marker, deadline = run_dir / "killed_here", time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read().decode("utf-8", "replace")[-3000:]
        assert time.time() < deadline, "training never reached the kill point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "models" / "G_HP.pt").exists()  # written only when training completes
    latest = latest_checkpoint(run_dir / "models")
    assert latest is not None and latest.endswith("checkpoint_iteration=4.pt")  # end of epoch 2

    out = subprocess.run(cmd(run_dir, "--resume", "true"), env=env, cwd=REPO, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Restored all variables from" in out.stdout + out.stderr and "checkpoint_iteration=4.pt" in out.stdout + out.stderr
    ref_out = ref.communicate(timeout=300)[0].decode("utf-8", "replace")
    assert ref.returncode == 0, ref_out[-3000:]
    for name in ("G_HP", "G_PH", "D_P", "D_H"):
        a = torch.load(ref_dir / "models" / f"{name}.pt", weights_only=True)
        b = torch.load(run_dir / "models" / f"{name}.pt", weights_only=True)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    ckpt = torch.load(latest, weights_only=True)
    # the schedule stepped once per iteration before the checkpoint: decay from iteration 2 of 6
    assert ckpt["g_lr_scheduler"]["last_epoch"] == 4 and ckpt["d_lr_scheduler"]["last_epoch"] == 4
    assert ckpt["g_optimizer"]["param_groups"][0]["lr"] < ckpt["g_lr_scheduler"]["base_lrs"][0]
    start = ckpt["G_HP"]
    final = torch.load(run_dir / "models" / "G_HP.pt", weights_only=True)
    assert any(not torch.equal(start[k], final[k]) for k in start)  # the resumed run did train epoch 3


def test_resume_from_latest_matches_uninterrupted(tmp_path):
    """Resume as the bundles do (CheckpointLoader of latest_checkpoint) + EpochReseed on a generic MONAI trainer: 2 epochs, then a new run to 4 epochs that
    resumes from the newest checkpoint, equals 4 uninterrupted epochs (shuffling, random flips/noise, dropout)."""
    from monai.bundle import run

    (tmp_path / "killpoint.py").write_text(KILLPOINT)
    (tmp_path / "train.yaml").write_text(TINY_BUNDLE)
    sys.path.insert(0, str(tmp_path))
    try:
        for run_dir, epochs in (("full", 4), ("part", 2), ("part", 4)):
            run("run", config_file=str(tmp_path / "train.yaml"), run_dir=str(tmp_path / run_dir), max_epochs=epochs)
    finally:
        sys.path.remove(str(tmp_path))
    assert (tmp_path / "part" / "resumed_from.txt").read_text().endswith("checkpoint_epoch=2.pt")
    assert (tmp_path / "full" / "resumed_from.txt").read_text() == "None"
    full = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "final.pt", weights_only=True)
    for k in full:
        torch.testing.assert_close(part[k], full[k], rtol=0, atol=0)


def test_without_reseed_a_resumed_run_diverges():
    """The control: an epoch's random draws depend on the history unless EpochReseed resets them."""

    class _State:
        epoch = 0

    class _Engine:
        state = _State()
        data_loader = None

    def draws(reseed: bool, start_epoch: int) -> list[float]:
        torch.manual_seed(0)
        eng = _Engine()
        seeder = EpochReseed(seed=5, rank=0)
        out = []
        for epoch in range(start_epoch, 4):
            eng.state.epoch = epoch
            if reseed:
                seeder(eng)
            out.append(float(torch.rand(1)) + float(np.random.rand()))
        return out

    assert draws(True, 1)[-2:] == draws(True, 2)[-2:]
    assert draws(False, 1)[-2:] != draws(False, 2)[-2:]
    assert epoch_seed(5, 2, 0) != epoch_seed(5, 2, 1) != epoch_seed(5, 3, 0)


def test_latest_checkpoint_skips_truncated(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") == ""
    with pytest.raises(FileNotFoundError, match="missing"):
        latest_checkpoint(tmp_path / "missing", required=True)
    for e in (1, 2, 10):
        torch.save({"trainer": {"iteration": e}, "w": torch.randn(256)}, tmp_path / f"checkpoint_epoch={e}.pt")
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")  # numeric, not lexical
    # a save interrupted by a kill leaves a truncated file: it is skipped
    data = (tmp_path / "checkpoint_epoch=10.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=10.pt").write_bytes(data[: len(data) // 2])
    assert not is_complete_checkpoint(tmp_path / "checkpoint_epoch=10.pt")
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=2.pt")
    (tmp_path / ".checkpoint_epoch=11.pt.tmp").write_bytes(data)
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=2.pt")


def test_reseed_reaches_transforms_inside_randomizable_datasets():
    """A Randomizable dataset wrapping datasets with random transforms (the synthesis data) is fully reseeded."""
    from monai.data import CacheDataset, Dataset
    from monai.transforms import Compose, RandFlipd, RandGaussianNoised, Randomizable

    from cmb_synthesis.training.resume import reseed_tree

    class Pair(torch.utils.data.Dataset, Randomizable):
        def __init__(self, a, b):
            self.a, self.b = a, b

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return self.R.rand(), self.a[i]["x"], self.b[i]["x"]

    def make():
        item = {"x": np.arange(64, dtype=np.float32).reshape(1, 4, 4, 4)}
        t_a = Compose([RandFlipd("x", prob=0.5), RandGaussianNoised("x", prob=1.0)])
        a = CacheDataset([dict(item), dict(item)], t_a, progress=False)
        return Pair(a, Dataset([dict(item)] * 2, RandGaussianNoised("x", prob=1.0)))

    one, two = make(), make()
    for _ in range(3):
        two[0]  # advance every random state of the second copy
    reseed_tree(one, 11)
    reseed_tree(two, 11)
    for i in range(2):
        for u, v in zip(one[i], two[i]):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# ---------------------------------------------------------------------------------------------------------------
# Batch inference of the synthesis bundle (cmb_synthesis.synthesis.inference.run_inference): atomic outputs, skip
# existing unless overwrite, never over an input.

KILL_DURING_SAVE = r'''
import os, signal, sys
import nibabel as nib
import torch
from cmb_synthesis.synthesis.networks import CMBGenerator
from cmb_synthesis.synthesis.inference import run_inference

real_save, calls = nib.save, []

def dying_save(img, filename, *a, **k):
    calls.append(str(filename))
    if ".s1_synthetic.nii.gz." in os.path.basename(str(filename)):  # the image's temporary file
        real_save(img, filename, *a, **k)
        data = open(filename, "rb").read()
        open(filename, "wb").write(data[: len(data) // 2])  # half-written file, then the process dies
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(img, filename, *a, **k)

nib.save = dying_save
torch.manual_seed(0)
run_inference(sys.argv[1], sys.argv[2], G_HP=CMBGenerator(channels=2, n_res_blocks=0, stem_kernel=3), patch=(48, 40, 16))
'''


def _scan_folder(tmp: Path) -> Path:
    import nibabel as nib

    rng = np.random.default_rng(0)
    affine = np.diag([-0.98, 0.98, 1.0, 1.0])
    shape = (48, 40, 36)
    src = tmp / "in"
    src.mkdir()
    for sid in ("s1", "s2"):
        img = (100 + 20 * rng.random(shape)).astype(np.float32)
        bm = np.zeros(shape, np.uint8)
        bm[4:44, 4:36, 2:34] = 1
        mask = np.zeros(shape, np.uint16)
        mask[20:23, 18:21, 15:18] = 1
        nib.save(nib.Nifti1Image(img, affine), str(src / f"{sid}_swi.nii.gz"))
        nib.save(nib.Nifti1Image(bm, affine), str(src / f"{sid}_brainmask.nii.gz"))
        nib.save(nib.Nifti1Image(mask, affine), str(src / f"{sid}_mask.nii.gz"))
    return src


@pytest.mark.e2e
def test_synthesis_inference_killed_while_writing_leaves_no_partial_output(tmp_path):
    import nibabel as nib

    src, out = _scan_folder(tmp_path), tmp_path / "out"
    (tmp_path / "die.py").write_text(KILL_DURING_SAVE)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "die.py"), str(src), str(out)], env=_env(tmp_path), capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode("utf-8", "replace")[-3000:]
    # the half-written image never appears under its final name, nor its label without it (one unit)
    assert not (out / "s1_synthetic.nii.gz").exists() and not (out / "s1_synthetic_cmb.nii.gz").exists()
    assert not (out / "inference_summary.json").exists()
    assert [f for f in out.iterdir() if f.name.startswith(".")]  # the killed run's temporaries
    for f in out.iterdir():  # whatever is there under a final name is complete
        if not f.name.startswith("."):
            nib.load(str(f)).get_fdata()
    # a rerun finishes the job: no output is mistaken for done
    from cmb_synthesis.synthesis.networks import CMBGenerator
    from cmb_synthesis.synthesis.inference import run_inference

    res = run_inference(src, out, G_HP=CMBGenerator(channels=2, n_res_blocks=0, stem_kernel=3), patch=(48, 40, 16))
    assert sorted(e["id"] for e in res["written"]) == ["s1", "s2"] and res["skipped"] == []
    assert nib.load(str(out / "s1_synthetic.nii.gz")).shape == (48, 40, 36)
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # stale temporaries removed at start


@pytest.mark.e2e
def test_synthesis_inference_skips_existing_overwrites_on_request_and_never_writes_over_inputs(tmp_path):
    import json

    from cmb_synthesis.synthesis.networks import CMBGenerator
    from cmb_synthesis.synthesis.inference import run_inference

    src, out = _scan_folder(tmp_path), tmp_path / "out"
    G = CMBGenerator(channels=2, n_res_blocks=0, stem_kernel=3)
    kw = dict(G_HP=G, patch=(48, 40, 16))
    assert sorted(e["id"] for e in run_inference(src, out, **kw)["written"]) == ["s1", "s2"]
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    again = run_inference(src, out, **kw)
    assert [e["id"] for e in again["skipped"]] == ["s1", "s2"] and not again["written"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == stamp
    forced = run_inference(src, out, overwrite=True, **kw)
    assert sorted(e["id"] for e in forced["written"]) == ["s1", "s2"]
    assert all(p.stat().st_mtime_ns != stamp[p.name] for p in out.glob("*.nii.gz"))

    # a datalist whose image is named like an output of the run: refused before any scan, even with overwrite
    other = tmp_path / "other"
    other.mkdir()
    before = (src / "s1_swi.nii.gz").read_bytes()
    (other / "s1_synthetic.nii.gz").write_bytes(before)
    items = [{"image": str(other / "s1_synthetic.nii.gz"), "brainmask": "s1_brainmask.nii.gz", "mask": "s1_mask.nii.gz",
              "group": "healthy", "id": "s1"}]  # fmt: skip
    (src / "datalist.json").write_text(json.dumps({"training": items}))
    with pytest.raises(ValueError, match="s1_synthetic.nii.gz: refusing to write over an input"):
        run_inference(src / "datalist.json", other, overwrite=True, raise_on_error=False, **kw)
    assert (other / "s1_synthetic.nii.gz").read_bytes() == before
    assert sorted(p.name for p in other.iterdir()) == ["s1_synthetic.nii.gz"]
    # and the datalist's own folder is an input folder
    with pytest.raises(ValueError, match="must differ from the input folder"):
        run_inference(src / "datalist.json", src, overwrite=True, raise_on_error=False, **kw)


def test_epoch_reseed_covers_seeded_samplers():
    """A WeightedRandomSampler with its own generator (the detection bundle's) replays an epoch after a resume."""

    class _State:
        epoch = 0

    def draws(start_epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(0)
        sampler = torch.utils.data.WeightedRandomSampler(torch.ones(50, dtype=torch.double), 8, generator=g)
        loader = torch.utils.data.DataLoader(list(range(50)), batch_size=8, sampler=sampler)

        class _Engine:
            state = _State()
            data_loader = loader

        seeder, out = EpochReseed(seed=1, rank=0), []
        for epoch in range(start_epoch, 4):
            _Engine.state.epoch = epoch
            seeder(_Engine)
            out.append(next(iter(loader)).tolist())
        return out

    full = draws(1)
    assert full[-2:] == draws(2)[-2:] and full[-1] == draws(3)[-1]
    assert full[0] != full[1]  # still random from epoch to epoch


# Batch inference of the detection bundle (cmb_synthesis.detection.inference.run_inference).


def _detector():
    from cmb_synthesis.detection.classifier import build_classifier

    torch.manual_seed(0)
    return build_classifier("classifier", patch_size=(32, 32, 16), channels=(4, 8), strides=(2, 2), num_res_units=1).eval()


@pytest.mark.e2e
def test_detection_inference_is_atomic_and_never_writes_over_inputs(tmp_path, monkeypatch):
    import nibabel as nib

    from cmb_synthesis.detection import inference as detection

    src, out = _scan_folder(tmp_path), tmp_path / "det"
    with pytest.raises(ValueError, match="must differ from the input folder"):
        detection.run_inference(_detector(), src, src, threshold=0.5)
    # a failure while writing s1's probability map: no partial file, s2 still processed, s1 reported
    real_save = nib.save

    def failing_save(img, filename, *a, **k):
        if ".s1_cmb_prob.nii.gz." in os.path.basename(str(filename)):
            real_save(img, filename, *a, **k)
            data = open(filename, "rb").read()
            open(filename, "wb").write(data[: len(data) // 2])
            raise OSError("disk full")
        return real_save(img, filename, *a, **k)

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(detection.BatchInferenceError, match="s1_swi.nii.gz: OSError: disk full"):
        detection.run_inference(_detector(), src, out, threshold=0.5)
    monkeypatch.setattr(nib, "save", real_save)
    names = sorted(p.name for p in out.iterdir())
    assert "s1_cmb_prob.nii.gz" not in names and "s2_cmb_prob.nii.gz" in names
    assert "s1_candidates.csv" not in names and "s2_candidates.csv" in names  # a scan's outputs are one unit
    assert not [n for n in names if n.startswith(".")]  # the temporary file was removed
    nib.load(str(out / "s2_cmb_prob.nii.gz")).get_fdata()


@pytest.mark.e2e
def test_detection_inference_skips_existing_outputs_unless_overwrite(tmp_path):
    from cmb_synthesis.detection import inference as detection

    src, out = _scan_folder(tmp_path), tmp_path / "det"
    detection.run_inference(_detector(), src, out, threshold=0.5)
    stamp = (out / "s1_cmb_prob.nii.gz").stat().st_mtime_ns
    summary = detection.run_inference(_detector(), src, out, overwrite=False, threshold=0.5)
    assert (out / "s1_cmb_prob.nii.gz").stat().st_mtime_ns == stamp
    assert not summary["failed"]
    # the default (no --overwrite) must not replace existing outputs either
    detection.run_inference(_detector(), src, out, threshold=0.5)
    assert (out / "s1_cmb_prob.nii.gz").stat().st_mtime_ns == stamp
    assert sorted(s["id"] for s in summary["skipped"]) == ["s1", "s2"] and not summary["written"]
    n_rows = {s["id"]: len((out / f"{s['id']}_candidates.csv").read_text().splitlines()) - 1 for s in summary["skipped"]}
    assert {s["id"]: s["n"] for s in summary["skipped"]} == n_rows
    # the aggregated candidates.csv of a run that skipped every scan still lists every scan's candidates
    first = (out / "s1_candidates.csv").read_text().splitlines()[1:] + (out / "s2_candidates.csv").read_text().splitlines()[1:]
    assert sorted((out / "candidates.csv").read_text().splitlines()[1:]) == sorted(first)
    forced = detection.run_inference(_detector(), src, out, overwrite=True, threshold=0.5)
    assert sorted(s["id"] for s in forced["written"]) == ["s1", "s2"] and not forced["skipped"]
    assert (out / "s1_cmb_prob.nii.gz").stat().st_mtime_ns != stamp


def test_key_metric_state_keeps_the_best_model_across_a_resume(tmp_path):
    """A resumed run (new evaluator, new saver) restores the best-so-far from the trainer's checkpoint: a worse
    validation after the resume leaves model.pt alone, a better one replaces it."""
    from ignite.engine import Engine, Events
    from monai.handlers import CheckpointSaver

    from cmb_synthesis.training.resume import KeyMetricState

    net = torch.nn.Linear(2, 1)

    def session(scores):
        ev = Engine(lambda e, b: None)
        it = iter(scores)

        @ev.on(Events.EPOCH_COMPLETED)
        def _score(e):  # stands in for the key metric of a MONAI evaluator
            e.state.metrics = {"val_cpm": next(it)}
            if e.state.metrics["val_cpm"] > getattr(e.state, "best_metric", -1):
                e.state.best_metric, e.state.best_metric_epoch = e.state.metrics["val_cpm"], e.state.epoch

        saver = CheckpointSaver(str(tmp_path), {"network": net}, save_key_metric=True, key_metric_name="val_cpm",
                                key_metric_filename="model.pt")  # fmt: skip
        saver.attach(ev)
        ev.state.best_metric, ev.state.best_metric_epoch = -1, -1
        return ev, saver, KeyMetricState(saver, ev)

    ev, saver, state = session([0.5, 0.8])
    for v in (1.0, 2.0):  # epoch 1 weights, then the best (epoch 2) weights
        torch.nn.init.constant_(net.weight, v)
        ev.run([0], max_epochs=ev.state.epoch + 1)
    torch.save({"best": state.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["best"]  # plain types: weights_only loads it
    assert saved["best_metric"] == 0.8 and saved["best_metric_epoch"] == 2
    best_bytes = (tmp_path / "model.pt").read_bytes()

    ev2, saver2, state2 = session([0.6, 0.9])
    state2.load_state_dict(saved)
    torch.nn.init.constant_(net.weight, 3.0)
    ev2.run([0], max_epochs=1)  # 0.6 < 0.8: model.pt keeps the best weights of the first session
    assert (tmp_path / "model.pt").read_bytes() == best_bytes and ev2.state.best_metric == 0.8
    torch.nn.init.constant_(net.weight, 4.0)
    ev2.run([0], max_epochs=2)  # 0.9 > 0.8: replaced
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].eq(4.0).all()
    with pytest.raises(ValueError, match="save_key_metric"):
        KeyMetricState(CheckpointSaver(str(tmp_path), {"network": net}, save_interval=1), ev2)
