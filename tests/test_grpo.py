"""GRPO: the objective against hand computations, the engine over a model being trained, routing replay, seeded
rollouts, and a short CLI run with an exact resume and export."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import TINY, naive_greedy
from dsv2.config import ModelConfig
from dsv2.engine.llm import LLM
from dsv2.engine.sampling_params import SamplingParams
from dsv2.model import build_model
from dsv2.model.moe import RoutingReplay
from dsv2.train.grpo import (Sequences, completion_logprobs, generate_rollout, group_advantages, grpo_token_loss,
                             token_weights)
from dsv2.train.grpo_config import GRPOConfig, Prompt, load_prompts, prompt_order

CFG = ModelConfig.from_dict({**TINY, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2})


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(CFG, init=False)
    model.init_weights(0.08)  # wide enough that routing and next tokens are far from uniform
    return model


def batch(model=None):
    prompts = [[0, 5, 9, 17], [0, 33], [0, 7, 7]]
    completions = [[40, 41, 1], [50], [60, 61, 62, 63, 1]]
    return Sequences.build(prompts, completions, "cpu")


# ---- the objective ---------------------------------------------------------------------------------------------
def test_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = group_advantages(r)
    std = torch.tensor([1.0, 0, 0, 1]).std()  # the sample std, n - 1
    assert torch.allclose(a[0], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (std + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))  # no spread, no signal
    assert torch.equal(group_advantages(r, scale=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_loss_and_gradient_match_hand_computation():
    """One update per rollout: ratio 1, so the loss is -mean(A) + beta * mean KL (grpo normalization) and the
    gradient is sum_t w_t (-A + beta (1 - pi_ref / pi_theta)) grad log pi_theta."""
    policy, reference = tiny_model(0), tiny_model(1)
    seqs = batch()
    A, beta = torch.tensor([1.5, -0.5, -1.0]), 0.04
    adv = A.repeat_interleave(torch.tensor(seqs.lengths))
    w = token_weights(seqs.lengths, "grpo", max_tokens=8)
    logp = completion_logprobs(policy, seqs)
    with torch.no_grad():
        ref = completion_logprobs(reference, seqs)
    t = grpo_token_loss(logp, logp.detach(), ref, adv, beta, 0.2)
    loss = (w * t.loss).sum()
    # the value: -mean(A) + beta * (per-sequence mean of k3, then mean over sequences)
    d = (ref - logp).detach()
    k3 = torch.exp(d) - d - 1
    per_seq_kl = torch.stack([x.mean() for x in k3.split(seqs.lengths)])
    assert loss.item() == pytest.approx((-A.mean() + beta * per_seq_kl.mean()).item(), rel=1e-5, abs=1e-7)
    assert not t.clipped.any()
    loss.backward()
    grads = [p.grad.clone() for p in policy.parameters()]
    assert sum(g.abs().sum() for g in grads) > 0
    # the hand derivative, through log pi only
    policy.zero_grad()
    coef = w * (-adv + beta * (1 - torch.exp(d)))
    (coef * completion_logprobs(policy, seqs)).sum().backward()
    for g, p in zip(grads, policy.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-7)


def test_loss_normalizations_by_hand():
    lengths = [1, 3, 2]
    per_token = torch.tensor([3.0, 1.0, 2.0, 3.0, 4.0, 8.0])
    seqs = [[3.0], [1.0, 2.0, 3.0], [4.0, 8.0]]
    grpo = sum(sum(s) / len(s) for s in seqs) / 3  # mean over each completion, then over completions
    dapo = sum(sum(s) for s in seqs) / 6  # one mean over all tokens
    dr = sum(sum(s) for s in seqs) / (3 * 10)  # sum over tokens / (completions x max_tokens)
    for mode, want in (("grpo", grpo), ("dapo", dapo), ("dr_grpo", dr)):
        got = (token_weights(lengths, mode, max_tokens=10) * per_token).sum().item()
        assert got == pytest.approx(want), mode
    with pytest.raises(ValueError, match="unknown loss normalization"):
        token_weights(lengths, "ppo", 10)


def test_clip_stops_the_gradient_where_it_binds():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0])
    t = grpo_token_loss(logp, torch.zeros(5), None, adv, beta=0.0, epsilon=0.2)
    # ratio 1.5 with A > 0 and 0.5 with A < 0 are clipped; the other direction and 1.1 are not
    assert t.clipped.tolist() == [True, True, False, False, False]
    t.loss.sum().backward()
    assert logp.grad[:2].tolist() == [0.0, 0.0] and (logp.grad[2:] != 0).all()
    assert grpo_token_loss(logp, torch.zeros(5), None, adv, 0.0, 0.2, epsilon_high=0.6).clipped.tolist() == \
        [False, True, False, False, False]  # clip-higher lets the 1.5 through


# ---- engine over the model being trained ------------------------------------------------------------------------
def test_engine_from_model_follows_optimizer_steps():
    model = tiny_model(2)
    llm = LLM.from_model(model, None, max_num_seqs=4, max_model_len=64, block_size=4)
    assert llm.model is model and llm.dtype == torch.float32
    prompts = [[0, 11, 12, 13, 14, 15, 16, 17, 18], [0, 3, 4]]  # two full blocks: a cacheable prefix
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    model.eval()
    before = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy)]
    assert before == [naive_greedy(model, p, 10) for p in prompts]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):  # push the model somewhere else: up the log-prob of another continuation
        opt.zero_grad()
        seqs = Sequences.build(prompts, [[20, 21, 22, 23]] * 2, "cpu")
        (-completion_logprobs(model, seqs).sum()).backward()
        opt.step()
    llm.refresh()
    after = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy)]
    assert after == [naive_greedy(model, p, 10) for p in prompts]
    assert after != before  # the update is seen: the same storage, nothing derived ahead of time
    with pytest.raises(ValueError, match="training layout"):
        from dsv2.capability import inference_plan
        from dsv2.model.inference import prepare_for_inference
        LLM.from_model(prepare_for_inference(tiny_model(3), inference_plan("cpu", "float32")))


def test_engine_samples_through_lora_adapters():
    from dsv2.train.grpo_config import GRPO_LORA_TARGETS
    from dsv2.train.lora import LoraConfig, apply_lora, lora_parameters
    model = tiny_model(8)
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(4, 8.0, GRPO_LORA_TARGETS + ("experts",)))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.3)  # B starts at zero: give the adapters something to say
    model.eval()
    llm = LLM.from_model(model, None, max_num_seqs=2, max_model_len=64)
    prompts = [[0, 4, 5, 6, 7], [0, 90]]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0, max_tokens=8,
                                                                                 ignore_eos=True))
    assert [o.token_ids for o in outs] == [naive_greedy(model, p, 8) for p in prompts]


def test_refresh_drops_stale_prefixes():
    model = tiny_model(4).eval()
    llm = LLM.from_model(model, None, max_num_seqs=2, max_model_len=64, block_size=4)
    prompt = list(range(2, 14))
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm.generate(prompt_token_ids=[prompt], sampling_params=greedy)
    with torch.no_grad():
        model.model.layers[0].self_attn.kv_b_proj.weight.mul_(-1.5)  # the cached latents' keys are now wrong
    llm.refresh()
    hits = llm.allocator.prefix_cache_hits
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=greedy)[0].token_ids
    assert llm.allocator.prefix_cache_hits == hits  # nothing old was reused
    assert out == naive_greedy(model, prompt, 6)


def test_engine_logprobs_match_the_training_forward():
    """The engine (paged latent cache, absorbed decode) and the training forward are the same model: the sampled
    tokens' log-probs agree to fp32 rounding."""
    model = tiny_model(5).eval()
    llm = LLM.from_model(model, None, max_num_seqs=8, max_model_len=64)
    prompts = [[0, 9, 8, 7], [0, 21]]
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=3, logprobs=0))
    comps = [c for o in outs for c in o.outputs]
    seqs = Sequences.build([p for p in prompts for _ in range(2)], [c.token_ids for c in comps], "cpu")
    with torch.no_grad():
        train = completion_logprobs(model, seqs)
    engine = torch.tensor([lp[t].logprob for c in comps for t, lp in zip(c.token_ids, c.logprobs)])
    assert torch.allclose(engine, train, atol=1e-4)


def test_rollouts_reproducible_with_seeds():
    model = tiny_model(6).eval()
    llm = LLM.from_model(model, None, max_num_seqs=16, max_model_len=64)
    prompts = [Prompt("a", [0, 5, 6], {}), Prompt("b", [0, 7], {})]
    cfg = GRPOConfig(prompts="-", reward="exact_match", model="-", group_size=4, max_tokens=6, seed=1)

    def tokens(c, step):
        return [[o.token_ids for o in group] for group in generate_rollout(llm, prompts, c, step)]
    first = tokens(cfg, 0)
    assert tokens(cfg, 0) == first
    assert len({tuple(t) for t in first[0]}) > 1  # the G samples of a prompt differ
    assert tokens(cfg, 1) != first and tokens(cfg.replace(seed=2), 0) != first
    assert prompt_order(5, 3, 0, 0) + prompt_order(5, 3, 1, 0)[:2] == \
        list(__import__("numpy").random.default_rng([0, 0]).permutation(5))  # epoch by epoch


def test_routing_replay_reproduces_the_rollout_forward():
    model = tiny_model(7).train()
    seqs = batch()
    router_out = {}
    with torch.no_grad():
        old = completion_logprobs(model, seqs, router_out=router_out)
    replay = RoutingReplay.of(router_out)
    assert torch.equal(completion_logprobs(model, seqs, router_out=replay), old)  # same weights: bit for bit
    with torch.no_grad():  # the update moved the routers: fresh routing now chooses other experts
        for layer in model.model.layers[1:]:
            layer.mlp.gate.weight.add_(torch.randn_like(layer.mlp.gate.weight))
    fresh, replayed = {}, RoutingReplay.of(router_out)
    completion_logprobs(model, seqs, router_out=fresh)
    logp = completion_logprobs(model, seqs, router_out=replayed)
    for layer, r in router_out.items():
        assert torch.equal(replayed[layer].topk_idx, r.topk_idx)
    assert any(not torch.equal(fresh[k].topk_idx.sort(-1).values, r.topk_idx.sort(-1).values)
               for k, r in router_out.items())
    logp.sum().backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0  # the router still learns
    with pytest.raises(ValueError, match="another batch"):
        completion_logprobs(model, Sequences.build([[0, 1]], [[2]], "cpu"), router_out=RoutingReplay.of(router_out))


# ---- prompts and the CLI ----------------------------------------------------------------------------------------
def test_load_prompts_reports_bad_lines(tmp_path, llm_dir):
    from dsv2.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(llm_dir)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "x = ", "answer": "1"}) + "\n\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}], "answer": "2"}) + "\n")
    ps = load_prompts(str(good), tok, ("answer",))
    assert ps[0].token_ids == tok.encode("x = ") and ps[0].fields == {"answer": "1"}
    assert ps[1].token_ids == tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": 1}\nnot json\n{"prompt": "b"}\n{"prompt": "c", "messages": []}\n'
                   '{"messages": [{"role": "robot", "content": "x"}], "answer": 1}\n')
    with pytest.raises(ValueError) as e:
        load_prompts(str(bad), tok, ("answer",))
    msg = str(e.value)
    assert "4 bad line(s)" in msg and "line 2" in msg and "line 3: has no 'answer'" in msg and "line 4" in msg
    assert "line 5" in msg


def _prompts(path, n=6):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"x = {i} + 1\nassert x == ", "answer": str(i + 1)}) + "\n")
    return str(path)


def _records(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_cli_run_resume_exact_and_export(tmp_path, llm_dir):
    from dsv2 import load_model
    from dsv2.cli import main as cli
    prompts = _prompts(tmp_path / "p.jsonl")
    reward = tmp_path / "r.py"  # a dense reward, so every group has a spread to learn from
    reward.write_text("def digits(prompt, completion, answer, **kw):\n"
                      "    return sum(ch.isdigit() for ch in completion) / (1 + len(completion))\n")
    common = ["--model", llm_dir, "--prompts", prompts, "--reward", f"{reward}:digits", "--steps", "3",
              "--batch-size", "2", "--group-size", "3", "--max-tokens", "5", "--lr", "1e-3", "--save-every", "1",
              "--updates-per-rollout", "2", "--replay-routing", "--beta", "0.1", "--micro-batch", "4", "--quiet"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert cli(["grpo", "--out", full, *common]) == 0
    recs = _records(full)
    assert [r["step"] for r in recs] == [1, 2, 3]
    r = recs[-1]
    assert r["kind"] == "grpo" and r["kl"] > 0 and r["grad_norm"] > 0 and 0 <= r["zero_spread"] <= 1
    for key in ("reward_mean", "reward_std", "clip_frac", "completion_len", "rollout_s", "update_s", "tokens"):
        assert key in r
    assert cli(["grpo", "--out", part, *common]) == 0
    assert cli(["grpo", "--resume", "--resume-step", "1", "--out", part, "--quiet"]) == 0
    drop = ("rollout_s", "reward_s", "update_s", "elapsed_s")
    strip = lambda rs: [{k: v for k, v in x.items() if k not in drop} for x in rs]  # noqa: E731
    assert strip(_records(part)) == strip(recs)  # bit-identical continuation
    assert cli(["grpo", "--out", full, *common]) == 1  # an existing run is not overwritten
    out = str(tmp_path / "exported")
    assert cli(["export", full, out]) == 0
    exported = load_model(out)
    state = torch.load(os.path.join(full, "checkpoints", "step-00000003.pt"), weights_only=True)["model"]
    assert torch.equal(exported.state_dict()["lm_head.weight"], state["lm_head.weight"])
    start = load_model(llm_dir)
    assert not torch.equal(exported.lm_head.weight, start.lm_head.weight)  # it trained
    assert cli(["grpo", "--plot", full]) == 0 and os.path.getsize(os.path.join(full, "plots", "reward.png")) > 0
    os.remove(os.path.join(full, "plots", "reward.png"))
    assert cli(["plot", full]) == 0 and os.path.getsize(os.path.join(full, "plots", "reward.png")) > 0  # dsv2 plot too


def test_evaluate_scores_greedy_completions(tmp_path, llm_dir):
    from dsv2.train.grpo_eval import evaluate_rewards
    from dsv2.train.rewards import exact_match
    prompts = _prompts(tmp_path / "p.jsonl", n=4)
    llm = LLM(llm_dir, dtype="float32")
    texts = [o.text for o in llm.generate([f"x = {i} + 1\nassert x == " for i in range(4)],
                                          SamplingParams(temperature=0, max_tokens=3))]
    with open(prompts, "w") as f:  # make two of the four right: the greedy text is their answer
        for i, t in enumerate(texts):
            f.write(json.dumps({"prompt": f"x = {i} + 1\nassert x == ", "answer": t if i < 2 else "nope"}) + "\n")
    out = evaluate_rewards(llm_dir, prompts, "exact_match", max_tokens=3)
    assert out["prompts"] == 4 and out["reward_mean"] == 0.5 and out["solved"] == 0.5
    assert [e["reward"] for e in out["examples"]] == [exact_match("", t, answer=a) for t, a in
                                                      zip(texts, texts[:2] + ["nope"] * 2)]


def test_cli_errors(tmp_path, llm_dir, capsys):
    from dsv2.cli import main as cli
    prompts = _prompts(tmp_path / "p.jsonl")
    assert cli(["grpo", "--out", str(tmp_path / "r"), "--prompts", prompts]) == 1
    assert "--reward required" in capsys.readouterr().err
    assert cli(["grpo", "--out", str(tmp_path / "r"), "--model", llm_dir, "--prompts", prompts,
                "--reward", "nonsense"]) == 1
    assert "is not a reward" in capsys.readouterr().err
    assert cli(["grpo", "--out", str(tmp_path / "r2"), "--model", llm_dir, "--prompts", prompts,
                "--reward", "exact_match", "--group-size", "1"]) == 1
    assert "group_size" in capsys.readouterr().err
    assert cli(["grpo", "--resume", "--out", str(tmp_path / "nowhere")]) == 1


def test_cli_lora_run_exports_the_merged_model(tmp_path, llm_dir):
    """--lora-rank: only the adapters train, the engine samples through them, resume restores them exactly and
    `dsv2 export` writes base + update."""
    from dsv2 import load_model
    from dsv2.cli import main as cli
    from dsv2.train.grpo import merged_state_dict
    from dsv2.train.lora import LoraConfig, apply_lora, merge_lora
    prompts = _prompts(tmp_path / "p.jsonl")
    reward = tmp_path / "r.py"
    reward.write_text("def digits(prompt, completion, **kw):\n"
                      "    return sum(ch.isdigit() for ch in completion) / (1 + len(completion))\n")
    common = ["--model", llm_dir, "--prompts", prompts, "--reward", f"{reward}:digits", "--steps", "2",
              "--batch-size", "2", "--group-size", "3", "--max-tokens", "5", "--lr", "1e-2", "--save-every", "1",
              "--lora-rank", "4", "--lora-targets", "q_b_proj,o_proj,experts", "--quiet"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert cli(["grpo", "--out", full, *common]) == 0
    assert cli(["grpo", "--out", part, *common]) == 0
    assert cli(["grpo", "--resume", "--resume-step", "1", "--out", part, "--quiet"]) == 0
    drop = ("rollout_s", "reward_s", "update_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in _records(part)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in _records(full)]
    state = torch.load(os.path.join(full, "checkpoints", "step-00000002.pt"), weights_only=True)
    assert set(state["lora"]) and all(".lora_" in k for k in state["lora"])
    # the saved plain state is what merge_lora makes of the adapted model
    model = load_model(llm_dir)
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(4, 8.0, ("q_b_proj", "o_proj", "experts")))
    from dsv2.train.lora import load_trainable_state_dict
    load_trainable_state_dict(model, state["lora"])
    merged = merged_state_dict(model)
    assert all(torch.equal(merged[k], v) for k, v in state["model"].items())
    plain = merge_lora(model).state_dict()
    assert all(torch.allclose(plain[k], v, atol=1e-6) for k, v in state["model"].items())
    base = load_model(llm_dir).state_dict()
    assert not torch.equal(state["model"]["model.layers.1.mlp.experts.down_proj"],
                           base["model.layers.1.mlp.experts.down_proj"])  # the experts' adapters trained
    assert torch.equal(state["model"]["model.layers.1.self_attn.kv_b_proj.weight"],
                       base["model.layers.1.self_attn.kv_b_proj.weight"])  # not a target
    out = str(tmp_path / "exported")
    assert cli(["export", full, out]) == 0
    assert torch.equal(load_model(out).lm_head.weight, load_model(llm_dir).lm_head.weight)
    assert cli(["grpo", "--out", str(tmp_path / "bad"), *common[:-3], "--lora-targets", "kv_b_proj"]) == 1
