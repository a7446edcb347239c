"""scripts/patch_llama.py: the AMX tile-config fix lands once, is idempotent, and refuses an unknown source."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "patch_llama.py"
spec = importlib.util.spec_from_file_location("patch_llama", SCRIPT)
patch_llama = importlib.util.module_from_spec(spec)
spec.loader.exec_module(patch_llama)

SOURCE = """inline void ggml_tile_config_init(void) {
    alignas(64) tile_config_t tc = {};
    tc.palette_id = 1;
    _tile_loadconfig(&tc);
    done = true;
}
"""


def _sdist(tmp_path: Path, text: str) -> Path:
    mmq = tmp_path / patch_llama.MMQ
    mmq.parent.mkdir(parents=True)
    mmq.write_text(text)
    return tmp_path


def test_barrier_lands_before_the_loadconfig_once(tmp_path):
    src = _sdist(tmp_path, SOURCE)
    assert patch_llama.patch(src) == "patched"
    text = (src / patch_llama.MMQ).read_text()
    barrier = text.index('asm volatile("" : : "r"(&tc) : "memory");')
    assert barrier < text.index("_tile_loadconfig(&tc);") and text.count("asm volatile") == 1
    assert patch_llama.patch(src) == "already patched"
    assert (src / patch_llama.MMQ).read_text() == text


def test_refuses_a_source_it_does_not_know(tmp_path):
    src = _sdist(tmp_path, SOURCE.replace("    done = true;\n", ""))
    with pytest.raises(SystemExit, match="not where edgespec expects"):
        patch_llama.patch(src)
