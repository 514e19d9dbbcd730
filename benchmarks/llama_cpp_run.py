"""Time llama.cpp (through llama-cpp-python) on a GGUF as `dsv2 bench --json` times dsv2: load, prefill of one random
prompt, greedy decode of one sequence; one JSON line out. Run it with the python whose llama_cpp build you want
(benchmarks/quant_compare.py does).

    python benchmarks/llama_cpp_run.py MODEL.gguf [--context 256] [--new 32] [--threads 2] [--no-extra-bufts]

--no-extra-bufts loads without llama.cpp's extra CPU weight buffers (AMX / repacked layouts): the AMX-enabled
native build aborts on some DeepSeek-V2 q8_0 GGUFs (GGML_ASSERT in ggml_backend_sched_split_graph) without it.
decode_weight_bytes_per_token counts the GGUF's tensors one decode step reads (routed expert tensors *_exps at
n_expert_used / n_expert, no token embedding), from the file's own tensor sizes.
"""
import argparse
import json
import resource
import time

import numpy as np


def decode_bytes(path: str) -> dict:
    try:
        import gguf
    except ImportError:
        return {}
    reader = gguf.GGUFReader(path, "r")
    arch = reader.get_field("general.architecture").contents()
    fields = {k: reader.get_field(f"{arch}.{k}") for k in ("expert_count", "expert_used_count")}
    routed = fields["expert_used_count"].contents() / fields["expert_count"].contents() if all(fields.values()) else 1
    total = active = 0
    for t in reader.tensors:
        size = int(t.n_bytes)
        total += size
        if t.name == "token_embd.weight" and any(x.name == "output.weight" for x in reader.tensors):
            continue  # looked up, not multiplied (a tied model multiplies it as the output matrix)
        active += size * (routed if "_exps." in t.name else 1)
    return {"weight_bytes": total, "decode_weight_bytes_per_token": int(active)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-extra-bufts", action="store_true")
    a = ap.parse_args()
    import llama_cpp
    import llama_cpp.llama_cpp as lc
    if a.no_extra_bufts:
        default = lc.llama_model_default_params

        def without_extra_bufts():
            p = default()
            p.use_extra_bufts = False
            return p
        lc.llama_model_default_params = without_extra_bufts
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=a.context + a.new + 8, n_threads=a.threads,
                          n_threads_batch=a.threads, n_batch=512, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t

    def next_token():  # argmax of the last position only, as a server computes it
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    prompt = [int(x) for x in np.random.default_rng(0).integers(2, min(llm.n_vocab(), 32000), a.context)]
    llm.eval(prompt[:16])  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    prefill = a.context / (time.perf_counter() - t)
    tok = next_token()
    t = time.perf_counter()
    for _ in range(a.new - 1):
        llm.eval([tok])
        tok = next_token()
    decode = (a.new - 1) / (time.perf_counter() - t)
    print(json.dumps({"engine": "llama.cpp", "gguf": a.gguf, "batch": 1, "context": a.context, "new": a.new,
                      "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "load_s": load_s,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "no_extra_bufts": a.no_extra_bufts, **decode_bytes(a.gguf)}))


if __name__ == "__main__":
    main()
