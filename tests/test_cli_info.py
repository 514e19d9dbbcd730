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
    assert d["kv_cache_bytes_per_token_fp8"] == 27 * (512 + 4 * 4 + 64 * 2)  # e4m3 latents, 4 scales, bf16 rope
    assert d["per_head_kv_cache_bytes_per_token"] == 27 * 16 * (192 + 128) * 2


def test_info_table_and_errors(tmp_path):
    from dsv2.cli import main
    assert main(["info", os.path.join(REFERENCE, "configs", "DeepSeek-V2")]) == 0
    assert main(["info", str(tmp_path)]) == 1  # no config.json: an error message, not a traceback


def test_info_system_shows_the_checked_capability_and_the_kernels_chosen():
    from dsv2.capability import cpu_capability
    from dsv2.kernels import cpu_mla, cpu_moe
    env = {**os.environ, "DSV2_CPU_CAPABILITY": "avx2"}
    run = lambda *a, e=None: subprocess.run([sys.executable, "-m", "dsv2.cli", "info", "--system", *a],
                                            capture_output=True, text=True, check=True, env=e).stdout
    here = json.loads(run("--json", "--device", "cpu"))
    cap = cpu_capability()
    assert here["cpu"]["level"] == cap.level and here["cpu"]["onednn_bf16"] == cap.onednn_bf16
    assert here["plan"]["weights"] == ("packed" if cap.onednn_bf16 else "upcast" if not cap.fast_bf16 else "plain")
    assert set(here["cpu"]["reasons"]) >= {"level", "onednn_bf16", "fast_bf16", "int8_gemv"}
    if cap.is_x86 and cap.level != "default":  # lowered to AVX2: no oneDNN bf16, bf16 weights computed in fp32
        low = json.loads(run("--json", "--device", "cpu", e=env))
        assert low["cpu"]["level"] == "avx2" and not low["cpu"]["onednn_bf16"]
        assert (low["plan"]["weights"], low["plan"]["compute_dtype"]) == ("upcast", "float32")
        kernel = low["decode_attention_kernel"]  # the AVX2 build of the decode attention kernel, no bf16 dot
        assert kernel["available"] and not kernel["bf16_dot"] and not kernel["amx"] and "-mavx2" in kernel["reason"], kernel
        experts = low["experts_kernel"]  # the AVX2 build of the expert kernel: widened bf16, fp32 FMAs
        assert experts["available"] and not experts["bf16_dot"] and "-mavx2" in experts["reason"], experts
        assert low["plan"]["cpu_experts_kernel"] is True
    kernel = here["decode_attention_kernel"]
    assert kernel["available"] is (cpu_mla.decode_kernel() is not None)
    assert kernel["bf16_dot"] is (kernel["available"] and cap.level == "avx512" and "avx512_bf16" in cap.flags)
    # AMX tiles where the native build has them (Linux grants the tile state to a process that asks)
    assert kernel["amx"] is (kernel["bf16_dot"] and "amx_bf16" in cap.flags and "amx_tile" in cap.flags)
    experts = here["experts_kernel"]
    assert experts["available"] is (cpu_moe.kernel() is not None) is here["plan"]["cpu_experts_kernel"]
    assert experts["bf16_dot"] is (experts["available"] and cap.level == "avx512" and "avx512_bf16" in cap.flags)
    table = run("--device", "cpu", "--quantization", "int8")
    assert "int8 GEMV kernel" in table and "linear <= 16 rows (decode)" in table and "weights int8" in table


def test_only_the_program_exits_early_after_a_process_group_not_main():
    """A process that left a process group ends through cli.entry without the interpreter's teardown (gloo can
    abort there); main() called in-process -- tests, notebooks -- must still return to its caller."""
    code = ("import dsv2.parallel.launch as launch; launch._LEFT = True\n"
            "from dsv2.cli import main\n"
            "print('returned', main(['info', '--system', '--json']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "returned 0" in out
    code = "import sys, dsv2.parallel.launch as launch; launch._LEFT = True; sys.argv = ['dsv2', 'info', '/no/such/dir']\n" \
           "import atexit; atexit.register(print, 'teardown ran')\nfrom dsv2.cli import entry; entry()\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 1 and "teardown ran" not in p.stdout  # the command's error code, then straight out
    assert "dsv2 info: error" in p.stderr
