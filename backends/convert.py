"""GGUF to MLX conversion: llama.cpp's weights as an mlx-lm model folder, made once and cached.

The result is a folder with ``config.json`` and ``model.safetensors`` in the layout of mlx-lm's model
classes (``mlx_lm.models.qwen2``, ``llama``, ``gemma3_text``), cached under
``<edgespec cache>/mlx/<model-stem>-<gguf|q4|q8|f16>`` and written atomically (a temporary folder,
then a rename). See ``mode`` for the weight formats; the default, ``gguf``, keeps llama.cpp's own
quantization codes wherever MLX's affine format can hold them exactly.

Weights are kept in llama.cpp's layout where that is exact: llama-arch GGUFs store Q and K with
llama.cpp's rope permutation (pairs of adjacent dimensions), so instead of undoing it we run the
model with ``rope_traditional=True``, which rotates exactly those pairs, as llama.cpp does.
Gemma norms in a GGUF already hold ``1 + w``; mlx-lm adds the 1 itself, so it is taken off here.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

GROUP_SIZE = 64
GGUF_GROUP = 32  # the block size of llama.cpp's quant types
MODES = {"4": "q4", "8": "q8", "none": "f16", "gguf": "gguf"}
FORMAT_VERSION = 3

# GGUF name inside a block -> mlx-lm name inside ``model.layers.N``
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAMES_BY_ARCH = {
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "qwen2": {"ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}


class ConvertError(RuntimeError):
    """The GGUF cannot be converted (unsupported architecture, tensor or setting)."""


def mode(bits: int | str | None) -> str:
    """``4`` -> ``q4``, ``8`` -> ``q8``, ``None``/``"none"`` -> ``f16``, ``"gguf"`` -> ``gguf``.

    ``q4``/``q8``: MLX affine quantization of the dequantized weights (group 64). ``f16``: float16.
    ``gguf``: llama.cpp's own codes, transcribed exactly where the block format allows (Q4_0/Q4_1/Q4_K
    -> MLX 4-bit, Q5_0/Q5_1/Q5_K -> 5-bit, Q8_0 -> 8-bit, group 32), 8-bit re-quantization elsewhere
    (Q6_K, Q2_K, Q3_K and the IQ types have 16-weight sub-blocks or non-affine codes).
    """
    key = "none" if bits is None else str(bits).lower()
    if key not in MODES:
        raise ConvertError(f"bits must be 4, 8, 'none' or 'gguf', not {bits!r}")
    return MODES[key]


def mlx_dir(gguf_path: str | Path, bits: int | str | None = "gguf") -> Path:
    """Where the converted model of ``gguf_path`` lives (whether or not it exists yet)."""
    from edgespec.paths import cache_dir

    return cache_dir() / "mlx" / f"{Path(gguf_path).stem}-{mode(bits)}"


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def mlx_name(gguf_name: str, arch: str) -> str:
    """The mlx-lm parameter name of a GGUF tensor name (``blk.3.attn_q.bias`` -> ``...q_proj.bias``)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4:
        table = {**_BLOCK_NAMES, **_BLOCK_NAMES_BY_ARCH[arch]}
        if parts[2] in table:
            return f"model.layers.{parts[1]}.{table[parts[2]]}.{parts[3]}"
    elif len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise ConvertError(f"GGUF tensor {gguf_name!r} has no counterpart in mlx-lm's {arch} model")


def _rope_scaling(reader, arch: str) -> dict | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    raise ConvertError(f"rope scaling {kind!r} is not supported by the MLX conversion yet")


def model_config(reader) -> dict:
    """An mlx-lm config dict (``ModelArgs`` fields) from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in MODEL_TYPES:
        raise ConvertError(f"architecture {arch!r} is not supported by the MLX backend "
                           f"(supported: {', '.join(MODEL_TYPES)})")
    names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_embd = int(_field(reader, f"{arch}.embedding_length"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    cfg = {
        "model_type": MODEL_TYPES[arch],
        "hidden_size": n_embd,
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "vocab_size": int(embd.shape[1]),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(reader, arch),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if arch == "llama":
        cfg["rope_traditional"] = True  # llama.cpp's NORM rope on its permuted Q/K layout
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
        cfg["mlp_bias"] = False
    elif arch == "qwen2":
        if head_dim != n_embd // n_head:
            raise ConvertError("qwen2 with a head_dim other than n_embd / n_head is not supported")
        cfg["rope_traditional"] = False  # llama.cpp's NEOX rope
    elif arch == "gemma3":
        n_layer = cfg["num_hidden_layers"]
        cfg["rope_local_base_freq"] = 10000.0  # fixed in llama.cpp for the sliding layers
        cfg["sliding_window"] = int(_field(reader, "gemma3.attention.sliding_window", 512))
        cfg["sliding_window_pattern"] = 6  # llama.cpp: every 6th layer is global
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B model (62 layers)
        cfg["query_pre_attn_scalar"] = n_embd / n_head if n_layer == 62 else head_dim
    return cfg


def _dequantized(reader, arch: str):
    """Yield (GGUF tensor, mlx name, float32 array in mlx-lm's layout) for every tensor of the GGUF."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = mlx_name(t.name, arch)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0  # GGUF holds 1 + w; mlx-lm's Gemma RMSNorm adds the 1
        yield t, name, w


def _probes() -> dict:
    """Block headers that make llama.cpp's dequantization return the raw integer codes.

    Scale 1 and offset 0 (for K-quants: d = 1, dmin = 0 and every 6-bit sub-block scale 1, min 0).
    Value: (code bits, header bytes written at the start of each block).
    """
    from gguf import GGMLQuantizationType as T

    one, zero = np.float16(1).tobytes(), np.float16(0).tobytes()
    k_scales = bytes([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1])
    return {T.Q4_0: (4, one), T.Q4_1: (4, one + zero), T.Q5_0: (5, one), T.Q5_1: (5, one + zero),
            T.Q8_0: (8, one), T.Q4_K: (4, one + zero + k_scales), T.Q5_K: (5, one + zero + k_scales)}


def transcribe(t, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """llama.cpp's codes of tensor ``t`` as MLX affine quantization (group 32), or None if not exact.

    Every block type in ``_probes`` is affine per 32 weights: w = s * q + b with q integer. The codes
    come from dequantizing the blocks with a unit header; s and b from the real values. Returns
    (packed uint32 [rows, cols * bits / 32], scales, biases, bits) with the source's bits (4, 5 or 8).
    """
    from gguf.quants import GGML_QUANT_SIZES, dequantize

    probe = _probes().get(t.tensor_type)
    if probe is None or w.ndim != 2 or w.shape[1] % GGUF_GROUP:
        return None
    code_bits, header = probe
    type_size = GGML_QUANT_SIZES[t.tensor_type][1]
    blocks = np.array(t.data, dtype=np.uint8).reshape(-1, type_size)
    blocks[:, :len(header)] = np.frombuffer(header, dtype=np.uint8)
    codes = dequantize(blocks.reshape(t.data.shape), t.tensor_type).reshape(w.shape)
    rows, cols = w.shape
    g = codes.reshape(rows, cols // GGUF_GROUP, GGUF_GROUP)
    q = np.rint(g - g.min(axis=-1, keepdims=True)).astype(np.int64)
    wg = w.reshape(g.shape).astype(np.float64)
    lo = np.take_along_axis(wg, q.argmin(-1)[..., None], -1)[..., 0]
    hi = np.take_along_axis(wg, q.argmax(-1)[..., None], -1)[..., 0]
    qmax = q.max(axis=-1)
    scale = np.where(qmax > 0, (hi - lo) / np.maximum(qmax, 1), 0.0)
    bias = lo
    err = np.abs(scale[..., None] * q + bias[..., None] - wg).max()
    if q.max() >= 1 << code_bits or err > 1e-5 * max(float(np.abs(wg).max()), 1e-12):
        return None
    return pack(q.reshape(rows, cols), code_bits), scale.astype(np.float16), bias.astype(np.float16), code_bits


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing of ``bits``-bit codes: each row a little-endian bit stream, read as uint32 words."""
    rows = q.shape[0]
    stream = ((q[..., None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(rows, -1)
    return np.packbits(stream, axis=1, bitorder="little").view("<u4")


def build_model(cfg: dict, weights: dict | None = None):
    """Instantiate the mlx-lm model of ``cfg`` (quantized layers if ``cfg['quantization']``).

    ``cfg['quantization']`` holds the default ``group_size``/``bits`` and, as in mlx-lm, optional
    per-layer entries (``{"model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8}}``).
    """
    import mlx.nn as nn

    arch = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(cfg))
    if weights is not None and hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    q = cfg.get("quantization")
    if q:
        keys = set(weights) if weights is not None else None

        def predicate(path, module):
            if path in q:
                return q[path]
            return _quantizable(module, q["group_size"]) and (keys is None or f"{path}.scales" in keys)

        nn.quantize(model, group_size=q["group_size"], bits=q["bits"], class_predicate=predicate)
    if weights is not None:
        model.load_weights(list(weights.items()), strict=True)
    return model


def _quantizable(module, group_size: int) -> bool:
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0


def _gguf_weights(reader, arch: str, bar) -> tuple[dict, dict]:
    """Weights for ``gguf`` mode, and the per-layer quantization entries of the config."""
    import mlx.core as mx

    weights, layers = {}, {}
    for t, name, w in bar(_dequantized(reader, arch)):
        path = name.removesuffix(".weight")
        res = transcribe(t, w) if name.endswith(".weight") else None
        is_float = t.tensor_type.name in ("F32", "F16", "BF16")
        if res is None and not is_float and w.ndim == 2 and w.shape[1] % GGUF_GROUP == 0:
            qw, qs, qb = mx.quantize(mx.array(w), GGUF_GROUP, 8)  # e.g. Q6_K: 16-weight sub-blocks
            res = (qw, qs.astype(mx.float16), qb.astype(mx.float16), 8)
        if res is None:
            weights[name] = mx.array(w).astype(mx.float16)
            continue
        packed, scales, biases, bits = res
        weights[name] = mx.array(packed)
        weights[f"{path}.scales"] = mx.array(scales)
        weights[f"{path}.biases"] = mx.array(biases)
        layers[path] = {"group_size": GGUF_GROUP, "bits": bits}
    return weights, layers


def convert(gguf_path: str | Path, bits: int | str | None = "gguf", out_dir: Path | None = None,
            force: bool = False, progress: bool = True) -> Path:
    """Convert ``gguf_path`` once and return the folder (``config.json`` + ``model.safetensors``).

    ``bits``: see ``mode``. A folder that exists and was made from a file of the same size (and the
    same format version) is reused unless ``force``.
    """
    import gguf
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    gguf_path = Path(gguf_path)
    kind = mode(bits)
    out = Path(out_dir) if out_dir else mlx_dir(gguf_path, bits)
    stamp = {"gguf": gguf_path.name, "gguf_size": gguf_path.stat().st_size, "format": FORMAT_VERSION}
    if not force and is_converted(out, stamp):
        return out
    reader = gguf.GGUFReader(gguf_path)
    cfg = model_config(reader)
    arch = _field(reader, "general.architecture")

    def bar(it):
        return tqdm(it, total=len(reader.tensors), unit="tensor", desc=f"convert {gguf_path.stem} ({kind})",
                    disable=not progress)

    if kind == "gguf":
        weights, layers = _gguf_weights(reader, arch, bar)
        cfg["quantization"] = {"group_size": GGUF_GROUP, "bits": 4, **layers}
        model = build_model(cfg, weights)
    else:
        weights = {name: mx.array(w).astype(mx.float16) for _, name, w in bar(_dequantized(reader, arch))}
        model = build_model(cfg, weights)
        if kind in ("q4", "q8"):
            nbits = int(kind[1:])
            nn.quantize(model, group_size=GROUP_SIZE, bits=nbits,
                        class_predicate=lambda p, m: _quantizable(m, GROUP_SIZE))
            cfg["quantization"] = {"group_size": GROUP_SIZE, "bits": nbits}
    del weights
    cfg["edgespec"] = stamp
    params = dict(tree_flatten(model.parameters()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), params, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_converted(out: Path, stamp: dict) -> bool:
    try:
        cfg = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return cfg.get("edgespec") == stamp and (out / "model.safetensors").exists()


def load(folder: Path):
    """Load a converted folder: (mlx-lm model with weights, config dict)."""
    import mlx.core as mx

    cfg = json.loads((Path(folder) / "config.json").read_text())
    weights = mx.load(str(Path(folder) / "model.safetensors"))
    model = build_model(cfg, weights)
    model.eval()
    return model, cfg
