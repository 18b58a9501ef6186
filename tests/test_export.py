"""Model-zoo sharing checks for both bundles: verify_metadata, verify_net_in_out, ckpt_export to TorchScript,
and large_files.yml (listed weights are verified by sha256).

The exports run on tiny checkpoints made from the bundles' own network definitions (random weights): what is
checked is that the released-weight path works, not the quality of any weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {
    # both inference configs are overlays merged over train.yaml (which defines the networks)
    "cmb_synthesis": {"config": ("train.yaml", "inference.yaml"), "nets": ("G_HP", "G_PH")},
    "cmb_detection": {"config": ("train.yaml", "inference.yaml"), "nets": ("network_def",)},
}


def _config_names(bundle: str) -> list[str]:
    names = BUNDLES[bundle]["config"]
    return [names] if isinstance(names, str) else list(names)


def _configs(bundle: str) -> tuple[Path, list[str]]:
    """The bundle's metadata.json and its inference config files (merged in this order)."""
    cdir = REPO / "bundles" / bundle / "configs"
    return cdir / "metadata.json", [str(cdir / n) for n in _config_names(bundle)]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_verify_metadata(bundle, tmp_path, meta_schema):
    from monai.bundle import verify_metadata

    meta, _ = _configs(bundle)
    verify_metadata(meta_file=str(meta), filepath=meta_schema)  # raises ValidationError on failure
    # and a broken copy is rejected (the check is real)
    bad = json.loads(meta.read_text())
    bad.pop("version")
    (tmp_path / "metadata.json").write_text(json.dumps(bad))
    with pytest.raises(Exception, match="version"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=meta_schema)


@pytest.mark.parametrize("bundle,net", [(b, n) for b in sorted(BUNDLES) for n in BUNDLES[b]["nets"]])
def test_verify_net_in_out(bundle, net):
    from monai.bundle import verify_net_in_out

    meta, config = _configs(bundle)
    verify_net_in_out(net_id=net, meta_file=str(meta), config_file=config, device="cpu")


def _tiny_checkpoint(bundle: str, net: str, path: Path) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    meta, config = _configs(bundle)
    p = ConfigParser()
    p.read_config(config)
    p.read_meta(str(meta))
    torch.manual_seed(0)
    network = p.get_parsed_content(net)
    with torch.no_grad():  # residual generators start as the identity: perturb so the export is non-trivial
        for q in network.parameters():
            q.add_(0.01 * torch.randn_like(q))
    torch.save(network.state_dict(), path)
    return network.eval()


def _input_shape(bundle: str) -> list[int]:
    """(1, C, ...) with the metadata's channels; the synthesis patch is shrunk to 32 x 32 x 16 to keep the test
    fast (a traced generator is tied to its trace shape: releases export at the metadata's 160 x 146 x 32)."""
    meta = json.loads(_configs(bundle)[0].read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    spatial = [int(s) for s in image["spatial_shape"]]
    return [1, int(image["num_channels"]), *([32, 32, 16] if bundle == "cmb_synthesis" else spatial)]


@pytest.mark.e2e
def test_ckpt_export_cli_generator(tmp_path):
    """``python -m monai.bundle ckpt_export`` of G_HP: the TorchScript module reproduces the checkpoint."""
    meta, config = _configs("cmb_synthesis")
    network = _tiny_checkpoint("cmb_synthesis", "G_HP", tmp_path / "G_HP.pt")
    cmd = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "G_HP",
        "--filepath", str(tmp_path / "G_HP.ts"), "--ckpt_file", str(tmp_path / "G_HP.pt"),
        "--meta_file", str(meta), "--config_file", repr(config), "--use_trace", "True",
        "--input_shape", str(_input_shape("cmb_synthesis")),
    ]  # fmt: skip
    res = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    extra = {"metadata.json": "", "train.json": "", "inference.json": ""}  # each config file, as JSON
    ts = torch.jit.load(str(tmp_path / "G_HP.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["network_data_format"]["inputs"]["image"]["num_channels"] == 2
    assert "G_HP" in json.loads(extra["train.json"]) and "run_inference" in json.loads(extra["inference.json"])
    x = torch.rand(_input_shape("cmb_synthesis"))
    x[:, 1] = (x[:, 1] > 0.95).float()
    with torch.no_grad():
        torch.testing.assert_close(ts(x), network(x), rtol=1e-5, atol=1e-5)


@pytest.mark.e2e
@pytest.mark.parametrize("bundle,net", [("cmb_synthesis", "G_PH"), ("cmb_detection", "network_def")])
def test_ckpt_export_function(bundle, net, tmp_path):
    """The same export through ``monai.bundle.ckpt_export`` (what the CLI calls) for G_PH and the classifier."""
    from monai.bundle import ckpt_export

    meta, config = _configs(bundle)
    network = _tiny_checkpoint(bundle, net, tmp_path / f"{net}.pt")
    ckpt_export(
        net_id=net, filepath=str(tmp_path / f"{net}.ts"), ckpt_file=str(tmp_path / f"{net}.pt"),
        meta_file=str(meta), config_file=config, use_trace=bundle == "cmb_synthesis", input_shape=_input_shape(bundle),
    )  # fmt: skip
    ts = torch.jit.load(str(tmp_path / f"{net}.ts"))
    x = torch.rand(_input_shape(bundle))
    with torch.no_grad():
        torch.testing.assert_close(ts(x), network(x), rtol=1e-5, atol=1e-5)


# what each bundle's training writes to models/ (tests/test_synthesis_bundle.py, tests/test_detection_bundle.py)
# and which of it is a release artifact
_TRAINING_OUTPUTS = {
    "cmb_synthesis": (
        ["G_HP.pt", "G_PH.pt", "D_P.pt", "D_H.pt", "lesion_bank.npz", "checkpoint_iteration=800.pt", "metrics.json"],
        {"G_HP.pt", "G_PH.pt", "D_P.pt", "D_H.pt", "lesion_bank.npz"},
    ),
    "cmb_detection": (["model.pt", "checkpoint_epoch=6.pt", "train_metrics.json"], {"model.pt"}),
}


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_release_lists_the_weights_inference_loads(bundle, tmp_path):
    """Sharing a trained bundle: ``python -m cmb_synthesis.training.weights --update`` writes a model-zoo
    large_files.yml with the sha256 of the released weights, and no resume checkpoint or log. This repository
    releases no weights (none can be hosted here), so no bundle commits a large_files.yml: a committed list of
    unpublished hashes would make every locally trained model fail its check. The refusal of a mismatching
    file is tested in tests/test_weights.py."""
    import shutil

    from cmb_synthesis.training import weights

    assert not (REPO / "bundles" / bundle / "large_files.yml").exists()
    b = tmp_path / bundle
    shutil.copytree(REPO / "bundles" / bundle / "configs", b / "configs")
    (b / "models").mkdir()
    written, released = _TRAINING_OUTPUTS[bundle]
    for n, name in enumerate(written):
        torch.save({"w": torch.full((2,), float(n))}, b / "models" / name)
    r = subprocess.run(
        [sys.executable, "-m", "cmb_synthesis.training.weights", "--bundle_dir", str(b), "--update"],
        capture_output=True, text=True, encoding="utf-8", env=_env(), cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    entries = weights.read_large_files(b)
    assert all(e["hash_type"] == "sha256" and e["path"].startswith("models/") for e in entries)
    assert {Path(e["path"]).name for e in entries} == released
    assert all(e["hash_val"] == weights.sha256_file(b / e["path"]) for e in entries)
    # the inference configs load exactly these names
    text = "".join((b / "configs" / n).read_text() for n in _config_names(bundle))
    assert all(name.split(".")[0] in text for name in released if not name.startswith("D_"))
