import json
import os

import pytest

from conftest import REFERENCE
from dsv2.config import ConfigError, ModelConfig

CONFIGS = os.path.join(REFERENCE, "configs")


@pytest.mark.parametrize("name", sorted(os.listdir(CONFIGS)))
def test_every_reference_config_loads(name):
    cfg = ModelConfig.from_pretrained(os.path.join(CONFIGS, name))
    assert cfg.latent_dim == 576
    assert cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling["factor"] == 40.0


def test_parameter_counts_of_the_published_models():
    v2 = ModelConfig.from_pretrained(os.path.join(CONFIGS, "DeepSeek-V2"))
    lite = ModelConfig.from_pretrained(os.path.join(CONFIGS, "DeepSeek-V2-Lite", "config.json"))
    assert v2.param_counts()["total"] == 235_741_434_880
    assert lite.param_counts()["total"] == 15_706_484_224
    assert 20e9 < v2.param_counts()["activated"] < 22e9  # paper: 21B
    assert 2.3e9 < lite.param_counts()["activated"] < 2.5e9  # paper: 2.4B
    assert v2.kv_cache_bytes_per_token() == 69_120


def _write(tmp_path, d):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    return p


def _published(**changes):
    with open(os.path.join(CONFIGS, "DeepSeek-V2", "config.json")) as f:
        d = json.load(f)
    d.update(changes)
    return d


def test_transformers5_rope_parameters_format_is_equivalent(tmp_path):
    d = _published()
    rs = d.pop("rope_scaling")
    d["rope_parameters"] = {"rope_type": rs.pop("type"), "rope_theta": d.pop("rope_theta"), **rs}
    a = ModelConfig.from_pretrained(_write(tmp_path, d))
    b = ModelConfig.from_pretrained(os.path.join(CONFIGS, "DeepSeek-V2"))
    assert a == b


def test_unknown_keys_are_ignored_and_round_trip(tmp_path):
    cfg = ModelConfig.from_pretrained(_write(tmp_path, _published(some_future_key=[1, 2], ep_size=8)))
    cfg.save(tmp_path / "out")
    assert ModelConfig.from_pretrained(tmp_path / "out") == cfg


@pytest.mark.parametrize("changes, field", [
    (dict(scoring_func="sigmoid"), "scoring_func"),
    (dict(n_routed_experts=100), "n_group"),  # 100 experts do not split into 8 groups
    (dict(topk_group=9), "topk_group"),
    (dict(topk_method="noaux_tc"), "topk_method"),
    (dict(rope_scaling={"type": "llama3", "factor": 8.0}), "rope_scaling"),
    (dict(rope_scaling={"factor": 8.0}), "rope_scaling"),
    (dict(num_experts_per_tok=200), "num_experts_per_tok"),
    (dict(hidden_size=-1), "hidden_size"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_impossible_values_name_the_field(tmp_path, changes, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_pretrained(_write(tmp_path, _published(**changes)))


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="deepseek_v2"):
        ModelConfig.from_pretrained(tmp_path)
