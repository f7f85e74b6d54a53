import json
import subprocess
import sys

import pytest
import torch

from lightning_defense.core.store import CorruptStoreError
from lightning_defense.diffusion.sparse import DIGESTS, SparseDenoiserBuilder, replicate, verify_model_dir

SETTINGS = dict(
    replication=2, num_train_timesteps=50, block_out_channels=(16, 32), layers_per_block=1, attention_resolutions=(4,),
    num_heads=2, train_steps=2, train_batch_size=8, progress=False,
)


def builder(tmp_path, **kwargs):
    return SparseDenoiserBuilder(tmp_path / "models", **{**SETTINGS, **kwargs})


def sparse_set():
    return torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_replication_gives_m_plus_one_copies():
    images = sparse_set()
    assert torch.equal(replicate(images, 2), torch.cat([images] * 3))
    with pytest.raises(ValueError, match="replication"):
        replicate(images, -1)


def test_model_is_trained_once_kept_by_content_and_verified_on_reuse(tmp_path, monkeypatch):
    first = builder(tmp_path)
    denoiser = first.build(sparse_set())
    directory = first.directory(first.augment(sparse_set()))
    assert denoiser.variance_type == "learned_range" and denoiser.source == str(directory)
    kept = files(directory)
    digests = json.loads(kept[DIGESTS])
    assert any(name.endswith(".safetensors") for name in digests) and not any(".tmp" in name for name in kept)
    monkeypatch.setattr(SparseDenoiserBuilder, "train", lambda *a, **k: pytest.fail("retrained"))
    again = builder(tmp_path).build(sparse_set())
    assert again.fingerprint() == denoiser.fingerprint()
    key = lambda **kw: builder(tmp_path, **kw).directory(builder(tmp_path, **kw).augment(sparse_set()))  # noqa: E731
    for change in ({"replication": 1}, {"train_steps": 3}, {"seed": 1}, {"lr": 1e-3}):
        assert key(**change) != directory, change


@pytest.mark.parametrize("damage", ["flip weights", "truncate weights", "no digests"])
def test_a_damaged_kept_model_is_trained_again_never_used(tmp_path, damage):
    first = builder(tmp_path)
    first.build(sparse_set())
    directory = first.directory(first.augment(sparse_set()))
    kept = files(directory)
    weights = next(directory.rglob("*.safetensors"))
    data = weights.read_bytes()
    if damage == "flip weights":
        weights.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))
    elif damage == "truncate weights":
        weights.write_bytes(data[: len(data) // 2])
    else:
        (directory / DIGESTS).unlink()
    with pytest.raises(CorruptStoreError, match=DIGESTS):
        verify_model_dir(directory)
    with pytest.warns(Warning, match="training the ECLIPSE diffusion model again"):
        builder(tmp_path).build(sparse_set())
    assert files(directory) == kept  # trained again, to the same bytes
    assert sorted(p.name for p in directory.parent.iterdir()) == [directory.name]  # nothing left aside


def test_diffusion_does_not_import_datamodules():
    code = ("import sys, lightning_defense.diffusion; "
            "sys.exit(any(m.startswith('lightning_defense.datamodules') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
