"""The trainer end to end on tiny models: the loss falls, a SIGKILLed run resumes bit for bit, checkpoints survive
crashes mid-write, and an export loads in dsv2 and transformers with the same logits."""
import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

from conftest import prepare_stdlib_data
from dsv2.cli import main as cli
from dsv2.train.checkpointing import list_checkpoints, load_latest, read_metrics, save_checkpoint
from dsv2.train.loop import train
from dsv2.train.train_config import TrainConfig

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small Python corpus -> tokenizer -> prepared shards, through the CLI."""
    return prepare_stdlib_data(tmp_path_factory.mktemp("train"))


def _tiny(data_dir, **kw) -> TrainConfig:
    base = dict(data=data_dir, model="debug", seq_len=64, batch_size=8, steps=30, lr=3e-3, warmup_steps=5,
                log_every=1, eval_every=15, eval_batches=2, save_every=15, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run") / "r")
    summary = train(_tiny(data_dir, aux_device=0.05, aux_comm=0.02), run, progress=False)
    return run, summary


def test_loss_falls_within_30_steps(trained_run):
    run, summary = trained_run
    recs = read_metrics(run)
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, 31))
    first, last = train_recs[0]["ce"], sum(r["ce"] for r in train_recs[-5:]) / 5
    assert first > 5.0 and last < first - 1.0, (first, last)  # ln(300) = 5.7 at init
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30] and evals[1]["val_loss"] < evals[0]["val_loss"]
    final = [r for r in recs if r["kind"] == "final"][0]
    assert 0 < final["val_bits_per_byte"] < 8 and final["val_bytes"] > 0
    assert summary["val_loss"] == final["val_loss"]
    moe = train_recs[-1]["moe"]
    assert set(moe) == {"1", "2"} and len(moe["1"]["load"]) == 8 and moe["1"]["dropped"] == 0.0
    assert all(train_recs[-1]["balance"][k] > 0 for k in ("expert", "device", "comm"))
    assert [s for s, _ in list_checkpoints(run)] == [15, 30]
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["vocab_size"] == 300 and cfg["max_position_embeddings"] == 64
    assert cfg["rope_scaling"]["original_max_position_embeddings"] == 64 and cfg["rope_scaling"]["factor"] == 1.0


def _cmd(data_dir, out, steps=300):
    return [sys.executable, "-m", "dsv2.cli", "train", "--data", data_dir, "--out", out, "--model", "debug",
            "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--steps", str(steps), "--lr", "3e-3",
            "--warmup-steps", "10", "--log-every", "1", "--save-every", "10", "--eval-every", "25",
            "--eval-batches", "2", "--threads", "1", "--capacity-factor", "1.0", "--paper-balance",
            "--no-final-eval", "--quiet"]


def _deterministic(records):
    drop = ("tokens_per_s", "elapsed_s", "wall_s")
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def test_sigkill_and_resume_logs_the_same_losses_bit_for_bit(data_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC)}
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    ref = subprocess.Popen(_cmd(data_dir, whole), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    proc = subprocess.Popen(_cmd(data_dir, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill a few steps past a checkpoint, mid-interval, no warning given
        steps = [r["step"] for r in read_metrics(killed) if r.get("kind") == "train"]
        if len(list_checkpoints(killed)) >= 2 and steps and steps[-1] % 10 >= 3:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in read_metrics(killed) if r.get("kind") == "train")
    last_ckpt = list_checkpoints(killed)[-1][0]
    assert killed_at > last_ckpt, "the kill should lose some logged steps that the resume must redo"

    resumed = subprocess.run(_cmd(data_dir, killed)[:-1] + ["--resume", "--quiet"], env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert f"from step-{last_ckpt:08d}.pt" in resumed.stderr.decode()
    assert ref.wait() == 0, ref.stderr.read().decode()

    a, b = read_metrics(whole), read_metrics(killed)
    assert [r["step"] for r in b if r["kind"] == "train"] == list(range(1, 301))  # no duplicates, no gaps
    assert _deterministic(a) == _deterministic(b)
    assert any(r["moe"]["1"]["dropped"] > 0 for r in b if r["kind"] == "train")  # dropping was exercised


def test_a_crash_mid_write_never_corrupts_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    run = str(tmp_path)
    for step in (1, 2):
        save_checkpoint(run, step, {"step": step, "w": torch.full((4,), float(step))}, keep=5)

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        save_checkpoint(run, 3, {"step": 3}, keep=1)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(run)] == [1, 2]  # the .tmp never took a checkpoint's name
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [  # nor did it leave anything behind
        "step-00000001.pt", "step-00000001.pt.sha256", "step-00000002.pt", "step-00000002.pt.sha256"]
    state, path = load_latest(run)
    assert state["step"] == 2 and torch.equal(state["w"], torch.full((4,), 2.0))

    with open(path, "r+b") as f:  # damage the newest anyway (a disk error): the previous one is used
        f.truncate(20)
    state, _ = load_latest(run)
    assert state["step"] == 1 and "cannot read checkpoint" in capsys.readouterr().err

    save_checkpoint(run, 4, {"step": 4}, keep=2)
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]


def test_export_loads_in_dsv2_and_transformers_with_the_same_logits(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM
    from dsv2 import load_model
    from dsv2.tokenizer import Tokenizer
    run, _ = trained_run
    out = str(tmp_path / "hf")
    assert cli(["export", run, out]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(os.listdir(out))
    ours = load_model(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = Tokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n" * 2)])
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert (a - b).abs().max() <= 1e-4
    # the export is the checkpoint: same logits as the trained weights themselves
    from dsv2.model import build_model
    from dsv2.config import ModelConfig
    trained = build_model(ModelConfig.from_pretrained(run), init=False)
    trained.load_state_dict(load_latest(run)[0]["model"])
    with torch.no_grad():
        torch.testing.assert_close(trained.eval()(ids), a, rtol=0, atol=0)

    assert cli(["export", run, str(tmp_path / "bf16"), "--dtype", "bfloat16", "--step", "15"]) == 0
    size = lambda d: os.path.getsize(os.path.join(d, "model.safetensors"))
    assert size(str(tmp_path / "bf16")) < 0.6 * size(out)
    full = size(out)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("my notes")
    assert cli(["export", run, out, "--dtype", "bfloat16"]) == 0  # over the old export: weights replaced, notes kept
    assert size(out) < 0.6 * full and open(os.path.join(out, "README.md")).read() == "my notes"
    assert sorted(os.listdir(tmp_path)) == ["bf16", "hf"]


def test_plot_writes_the_charts(trained_run, tmp_path):
    pytest.importorskip("matplotlib")
    run, _ = trained_run
    assert cli(["plot", run, "--out", str(tmp_path)]) == 0
    for name in ("loss.png", "lr.png", "throughput.png", "expert_load.png"):
        assert os.path.getsize(tmp_path / name) > 5000, name


def test_run_directory_guards(trained_run, data_dir):
    run, _ = trained_run
    with pytest.raises(ValueError, match="--resume"):
        train(_tiny(data_dir), run, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        _tiny(data_dir, batch_size=0)
    with pytest.raises(FileNotFoundError, match="preset"):
        train(_tiny(data_dir, model="no-such-model"), run + "-x", progress=False)
    assert not os.path.exists(run + "-x")


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(data_dir, tmp_path):
    import threading
    run = str(tmp_path / "r")

    def interrupt_after_step_5():
        while not any(r.get("step", 0) >= 5 for r in read_metrics(run)):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_step_5, daemon=True).start()
    out = train(_tiny(data_dir, steps=400, save_every=1000, final_eval=False), run, progress=False)
    assert out["stopped"] and 5 <= out["step"] < 400
    assert [s for s, _ in list_checkpoints(run)] == [out["step"]]
    done = train(TrainConfig.load(run).replace(steps=out["step"] + 3), run, resume=True, progress=False)
    assert done["step"] == out["step"] + 3
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == list(range(1, out["step"] + 4))


def test_greedy_and_seeded_samples_are_reproducible(trained_run, tmp_path):
    from dsv2 import load_model
    from dsv2.tokenizer import Tokenizer
    from dsv2.train.export import export
    from dsv2.train.samples import complete
    run, _ = trained_run
    export(run, str(tmp_path))
    model, tok = load_model(str(tmp_path)), Tokenizer.from_pretrained(str(tmp_path))
    greedy = complete(model, tok, "def f(x):", max_new_tokens=8)
    with torch.no_grad():
        first = int(model(torch.tensor([tok.encode("def f(x):")]))[0, -1].argmax())
    assert greedy.startswith(tok.decode([first])) or first in model.config.eos_token_ids
    assert complete(model, tok, "def f(x):", max_new_tokens=8) == greedy
    sampled = [complete(model, tok, "def f(x):", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # the same seed, the same sample
    assert sampled[2] != sampled[0]  # and the seed is what decides it: another one draws another sample


def test_a_checkpoint_with_flipped_bytes_is_caught_by_its_checksum(tmp_path, capsys):
    run = str(tmp_path)
    for step in (1, 2):
        save_checkpoint(run, step, {"step": step, "w": torch.full((1000,), float(step))}, keep=5)
    (_, older), (_, newest) = list_checkpoints(run)
    data = bytearray(open(newest, "rb").read())
    data[data.find(struct.pack("<f", 2.0) * 16) + 5] ^= 1  # one bit of the tensor data: torch.load reads it happily
    open(newest, "wb").write(data)
    state, path = load_latest(run)
    assert state["step"] == 1 and path == older and torch.equal(state["w"], torch.full((1000,), 1.0))
    err = capsys.readouterr().err
    assert "step-00000002.pt" in err and "checksum" in err
    os.remove(older + ".sha256")  # as an older dsv2 wrote them: loaded, with a word that nothing was verified
    state, _ = load_latest(run)
    assert state["step"] == 1 and "no checksum" in capsys.readouterr().err


def test_resume_with_no_readable_checkpoint_fails_and_changes_nothing(trained_run, tmp_path, capsys):
    run = str(tmp_path / "r")
    shutil.copytree(trained_run[0], run)
    (_, older), (_, newest) = list_checkpoints(run)
    with open(newest, "r+b") as f:
        f.truncate(1000)
    data = bytearray(open(older, "rb").read())
    data[len(data) // 2] ^= 1
    open(older, "wb").write(data)
    before = {p: open(p, "rb").read() for p in sorted(glob.glob(os.path.join(run, "**"), recursive=True))
              if os.path.isfile(p)}
    assert cli(["train", "--resume", "--out", run, "--steps", "40", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "step-00000015.pt" in err and "step-00000030.pt" in err and "checksum" in err, err
    assert "Nothing was changed" in err and "--out" in err
    after = {p: open(p, "rb").read() for p in sorted(glob.glob(os.path.join(run, "**"), recursive=True))
             if os.path.isfile(p)}
    assert after == before  # metrics.jsonl, train_config.json and the checkpoints as they were


def test_divergence_advice_and_resume_step_go_back_keeping_the_abandoned_history(data_dir, tmp_path, capsys):
    run = str(tmp_path / "r")
    train(_tiny(data_dir, steps=4, save_every=2, eval_every=100, final_eval=False), run, progress=False)
    state, _ = load_latest(run)
    state["model"]["lm_head.weight"].fill_(float("nan"))  # a checkpoint whose numbers, not bytes, went bad
    save_checkpoint(run, 4, state, keep=3)
    with pytest.raises(FloatingPointError) as e:
        train(TrainConfig.load(run).replace(steps=6), run, resume=True, progress=False)
    msg = str(e.value)
    assert "step 5" in msg and f"dsv2 train --resume --out {run} --resume-step 2 --lr" in msg, msg
    capsys.readouterr()

    # the advice, followed: back to step 2 with a lower learning rate
    assert cli(["train", "--resume", "--out", run, "--resume-step", "2", "--lr", "1e-3", "--steps", "6",
                "--quiet"]) == 0
    assert "moved to" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in list_checkpoints(run)] == [2, 4, 6]
    (aside,) = glob.glob(os.path.join(run, "superseded", "*"))  # the abandoned steps 3-4, kept for comparison
    assert sorted(os.listdir(os.path.join(aside, "checkpoints"))) == ["step-00000004.pt", "step-00000004.pt.sha256"]
    with open(os.path.join(aside, "metrics.jsonl")) as f:
        assert [(r["kind"], r["step"]) for r in map(json.loads, f)] == [("train", 3), ("train", 4), ("eval", 4)]
