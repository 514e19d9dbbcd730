import json
import os
import subprocess
import sys

from conftest import REFERENCE


def test_info_json_on_a_config_only_directory(tmp_path):
    src = os.path.join(REFERENCE, "configs", "DeepSeek-V2-Lite", "config.json")
    (tmp_path / "config.json").write_text(open(src).read())
    out = subprocess.run([sys.executable, "-m", "dsv2.cli", "info", str(tmp_path), "--json"],
                         capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    assert d["total_params"] == 15_706_484_224
    assert 2.3e9 < d["activated_params"] < 2.5e9
    assert d["kv_cache_bytes_per_token"] == 27 * 576 * 2
    assert d["per_head_kv_cache_bytes_per_token"] == 27 * 16 * (192 + 128) * 2


def test_info_table_and_errors(tmp_path):
    from dsv2.cli import main
    assert main(["info", os.path.join(REFERENCE, "configs", "DeepSeek-V2")]) == 0
    assert main(["info", str(tmp_path)]) == 1  # no config.json: an error message, not a traceback
