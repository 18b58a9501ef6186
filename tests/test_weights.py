"""Released-weights checks: large_files.yml reading/writing, sha256 refusal, weights-only loading."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cmb_synthesis.training import weights


class _Evil:
    """A pickled object: a weights-only load must refuse to rebuild it."""

    def __reduce__(self):
        return (print, ("code executed",))


def _bundle(tmp_path: Path) -> Path:
    b = tmp_path / "bundle"
    (b / "models").mkdir(parents=True)
    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 1, 3)
    torch.save(net.state_dict(), b / "models" / "G_HP.pt")
    torch.save({"G_PH": net.state_dict(), "epoch": 3}, b / "models" / "G_PH.pt")
    torch.save({"trainer": {"epoch": 1}}, b / "models" / "checkpoint_epoch=1.pt")
    (b / "models" / ".gitkeep").write_text("")
    return b


def test_sha256_matches_hashlib(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * 1000)
    assert weights.sha256_file(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        weights.sha256_file(tmp_path / "missing.bin")


def test_update_then_verify_and_refuse_tampered(tmp_path, capsys):
    b = _bundle(tmp_path)
    assert weights.main(["--bundle_dir", str(b), "--update", "--url_base", "https://example.org/rel/"]) == 0
    entries = weights.read_large_files(b)
    # released weights only: no resume checkpoints, no hidden files
    assert [e["path"] for e in entries] == ["models/G_HP.pt", "models/G_PH.pt"]
    assert all(e["hash_type"] == "sha256" and len(e["hash_val"]) == 64 for e in entries)
    assert entries[0]["url"] == "https://example.org/rel/G_HP.pt"
    assert yaml.safe_load((b / "large_files.yml").read_text())["large_files"][0]["hash_val"] == weights.sha256_file(
        b / "models" / "G_HP.pt"
    )
    assert weights.main(["--bundle_dir", str(b)]) == 0
    assert len(weights.verify_bundle(b)) == 2

    # tamper with a released file: verification, CLI and loading all refuse it, naming both hashes
    good = entries[0]["hash_val"]
    sd = torch.load(b / "models" / "G_HP.pt", weights_only=True)
    sd["weight"] += 1e-3
    torch.save(sd, b / "models" / "G_HP.pt")
    bad = weights.sha256_file(b / "models" / "G_HP.pt")
    with pytest.raises(weights.WeightsHashError, match=rf"G_HP\.pt.*expected {good}, actual {bad}"):
        weights.verify_bundle(b)
    with pytest.raises(ValueError, match="G_HP.pt"):
        weights.load_weights(b / "models" / "G_HP.pt")  # looked up in the bundle's large_files.yml
    capsys.readouterr()
    assert weights.main(["--bundle_dir", str(b)]) == 1
    assert f"expected {good}, actual {bad}" in capsys.readouterr().err
    # the URL survives an --update of changed weights
    weights.update_large_files(b)
    assert weights.read_large_files(b)[0]["url"] == "https://example.org/rel/G_HP.pt"
    assert weights.read_large_files(b)[0]["hash_val"] == bad


def test_load_weights_explicit_hash_and_nested_key(tmp_path):
    b = _bundle(tmp_path)
    p = b / "models" / "G_PH.pt"
    state = weights.load_weights(p, expected_sha256=weights.sha256_file(p))
    assert state["epoch"] == 3
    with pytest.raises(weights.WeightsHashError, match="G_PH.pt"):
        weights.load_weights(p, expected_sha256="0" * 64)
    net = torch.nn.Conv3d(2, 1, 3)
    weights.load_network_weights(net, p, key="G_PH")
    torch.testing.assert_close(net.weight, state["G_PH"]["weight"])
    with pytest.raises(ValueError, match="no entry 'D_P'"):
        weights.load_network_weights(net, p, key="D_P")
    # DDP-saved state dicts ("module." prefix) load into a plain network
    ddp_like = {f"module.{k}": v + 1 for k, v in net.state_dict().items()}
    torch.save(ddp_like, b / "models" / "ddp.pt")
    weights.load_network_weights(net, b / "models" / "ddp.pt")
    torch.testing.assert_close(net.bias, ddp_like["module.bias"])


def test_load_weights_is_weights_only(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "payload": _Evil()}, p)
    with pytest.raises(ValueError, match="evil.pt: not a weights-only"):
        weights.load_weights(p)


@pytest.mark.parametrize(
    "content, message",
    [
        ("large_files: 3", "'large_files' list"),
        ("large_files:\n  - {url: x}", "needs a 'path'"),
        ("large_files:\n  - {path: models/a.pt, hash_val: abc}", "no valid sha256"),
        ("large_files:\n  - {path: ../a.pt, hash_val: " + "a" * 64 + "}", "stay inside"),
        ("large_files:\n  - {path: a.pt, hash_type: crc, hash_val: ab}", "unsupported hash_type"),
    ],
)
def test_bad_large_files_named(tmp_path, content, message):
    f = tmp_path / "large_files.yml"
    f.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        weights.read_large_files(f)
    assert str(f) in str(info.value)


def test_missing_listed_file_and_cli_module(tmp_path):
    b = _bundle(tmp_path)
    weights.update_large_files(b)
    (b / "models" / "G_PH.pt").unlink()
    with pytest.raises(FileNotFoundError, match="G_PH.pt: listed in"):
        weights.verify_bundle(b)
    assert len(weights.verify_bundle(b, missing_ok=True)) == 1
    out = subprocess.run(
        [sys.executable, "-m", "cmb_synthesis.training.weights", "--bundle_dir", str(b), "--missing_ok"],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert "1 file(s) verified" in out.stdout


def test_bundle_inference_refuses_tampered_released_weights(tmp_path):
    """Both bundles' inference load weights through this module: a listed file with a wrong sha256 is refused."""
    from cmb_synthesis.detection.classifier import build_classifier
    from cmb_synthesis.detection.inference import load_classifier
    from cmb_synthesis.synthesis.networks import CMBGenerator
    from cmb_synthesis.synthesis.inference import run_inference

    b = tmp_path / "bundle"
    (b / "models").mkdir(parents=True)
    G = CMBGenerator(channels=2, n_res_blocks=0, stem_kernel=3)
    clf = build_classifier("classifier", patch_size=(32, 32, 16), channels=(4, 8), strides=(2, 2), num_res_units=1)
    torch.save(G.state_dict(), b / "models" / "G_HP.pt")
    torch.save(clf.state_dict(), b / "models" / "model.pt")
    weights.update_large_files(b)
    load_classifier(clf, b / "models" / "model.pt")  # untouched: loads
    for name, sd in (("G_HP.pt", G.state_dict()), ("model.pt", clf.state_dict())):
        k = next(iter(sd))
        torch.save({**sd, k: sd[k] + 1e-3}, b / "models" / name)
    with pytest.raises(weights.WeightsHashError, match="G_HP.pt: sha256 mismatch"):
        run_inference(tmp_path, tmp_path / "out", G_HP=G, ckpt_dir=b / "models")
    with pytest.raises(weights.WeightsHashError, match="model.pt: sha256 mismatch"):
        load_classifier(clf, b / "models" / "model.pt")
