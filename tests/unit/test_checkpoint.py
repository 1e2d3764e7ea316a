"""Checkpoint bookkeeping without a process group: retention, leftovers of
killed saves, what makes a resume refused, and the checkpointing config keys."""

import json
import os

import pytest

from megatron_dpo.checkpoint.fingerprint import data_fingerprint
from megatron_dpo.checkpoint.files import ARCH_FILE, TRAIN_STATE_FILE
from megatron_dpo.checkpoint.load import check_compatible, resume_candidates
from megatron_dpo.checkpoint.save import complete_steps, prune_checkpoints, remove_incomplete
from megatron_dpo.config import ConfigError, load_config
from megatron_dpo.config.load import duration_seconds
from megatron_dpo.config.schema import CheckpointingConfig
from megatron_dpo.data import TokenizedPair

ARCH = {"num_layers": 4, "hidden_size": 64}
FINGERPRINTS = {"tokenizer": "t0", "data": "d0"}


def _step(run_dir, step, metrics=None, arch=ARCH, fingerprints=FINGERPRINTS):
    directory = os.path.join(run_dir, f"step_{step}")
    os.makedirs(directory)
    with open(os.path.join(directory, ARCH_FILE), "w") as handle:
        json.dump(arch, handle)
    with open(os.path.join(directory, TRAIN_STATE_FILE), "w") as handle:
        json.dump({"step": step, "metrics": metrics or {}, "fingerprints": fingerprints}, handle)
    return directory


def test_keep_top_k_keeps_the_best_by_metric_plus_the_newest(tmp_path):
    losses = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.2, 5: None, 6: 0.7}
    for step, loss in losses.items():
        _step(tmp_path, step, {} if loss is None else {"val:loss": loss})
    cfg = CheckpointingConfig(checkpoint_dir=str(tmp_path), keep_top_k=2, metric_name="val:loss")
    assert prune_checkpoints(cfg) == [1, 3, 5]
    assert complete_steps(str(tmp_path)) == [2, 4, 6]
    cfg.higher_is_better = True  # the best two are now 6 (0.7) and 2 (0.3)
    assert prune_checkpoints(cfg) == [4]


def test_keep_top_k_without_metric_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        _step(tmp_path, step)
    assert prune_checkpoints(CheckpointingConfig(checkpoint_dir=str(tmp_path), keep_top_k=1)) == [1, 2]
    assert prune_checkpoints(CheckpointingConfig(checkpoint_dir=str(tmp_path))) == []


def test_half_written_checkpoints_are_invisible_and_removed(tmp_path):
    _step(tmp_path, 1)
    os.makedirs(os.path.join(tmp_path, ".tmp_step_2", "policy"))
    os.makedirs(os.path.join(tmp_path, "step_3"))  # no train_state.json: not complete
    assert complete_steps(str(tmp_path)) == [1]
    assert resume_candidates(CheckpointingConfig(checkpoint_dir=str(tmp_path))) == [os.path.join(tmp_path, "step_1")]
    assert remove_incomplete(str(tmp_path)) == [".tmp_step_2"]
    assert sorted(os.listdir(tmp_path)) == ["step_1", "step_3"]


def test_resume_path_must_be_a_complete_checkpoint(tmp_path):
    cfg = CheckpointingConfig(checkpoint_dir=str(tmp_path), resume=str(tmp_path / "step_9"))
    with pytest.raises(ConfigError, match=r"checkpointing.resume=.*step_9.* is not a complete checkpoint"):
        resume_candidates(cfg)
    assert resume_candidates(CheckpointingConfig(checkpoint_dir=str(tmp_path), resume="never")) == []


def test_resume_into_another_model_names_the_fields(tmp_path):
    directory = _step(tmp_path, 1)
    state = {"fingerprints": FINGERPRINTS}
    other = dict(ARCH, num_layers=2)
    with pytest.raises(ConfigError, match=r"num_layers: checkpoint 4, this run 2"):
        check_compatible(directory, state, other, FINGERPRINTS, allow_config_change=True)


def test_resume_with_other_tokenizer_or_data_is_refused_unless_allowed(tmp_path):
    directory = _step(tmp_path, 1)
    state = {"fingerprints": FINGERPRINTS}
    with pytest.raises(ConfigError, match=r"the tokenizer \(policy.tokenizer.\*\) differ.*allow_config_change=true"):
        check_compatible(directory, state, ARCH, dict(FINGERPRINTS, tokenizer="t1"), allow_config_change=False)
    with pytest.raises(ConfigError, match=r"the training data \(data.train_data_path"):
        check_compatible(directory, state, ARCH, dict(FINGERPRINTS, data="d1"), allow_config_change=False)
    check_compatible(directory, state, ARCH, {"tokenizer": "t1", "data": "d1"}, allow_config_change=True)


def test_data_fingerprint_follows_token_ids_order_and_boundaries():
    pairs = [TokenizedPair([1, 2, 3], [1, 2, 4], 2, 2), TokenizedPair([5, 6], [5, 7], 1, 1)]
    moved = [TokenizedPair([1, 2], [3, 1, 2, 4], 2, 2), pairs[1]]  # same ids, other boundary
    assert data_fingerprint(pairs) == data_fingerprint(list(pairs))
    assert len({data_fingerprint(pairs), data_fingerprint(pairs[::-1]), data_fingerprint(moved)}) == 3


def test_checkpointing_keys_are_checked_at_load():
    assert duration_seconds("03:45:00") == 13500 and duration_seconds("01:00:00:30") == 86430
    with pytest.raises(ConfigError, match=r"checkpoint_must_save_by.*HH:MM:SS"):
        load_config(None, ["checkpointing.checkpoint_must_save_by=3h"])
    with pytest.raises(ConfigError, match=r"checkpointing.metric_name.*val:loss"):
        load_config(None, ["checkpointing.metric_name=loss"])
    assert load_config(None, ["checkpointing.metric_name=val/chat:accuracy"]).checkpointing.metric_name


def test_dp_reshardable_optimizer_state_is_refused_at_another_model_parallel_layout():
    from megatron_dpo.config.errors import ConfigError
    from megatron_dpo.train.resume import check_optimizer_layout

    saved = {"tp": 1, "pp": 1, "dp": 2, "vpp": None}
    check_optimizer_layout("step_3", "dp_reshardable", saved, dict(saved, dp=4))  # DP may change
    check_optimizer_layout("step_3", "fully_reshardable", saved, dict(saved, tp=2))
    with pytest.raises(ConfigError, match="checkpointing.optimizer_format=fully_reshardable"):
        check_optimizer_layout("step_3", "dp_reshardable", saved, dict(saved, tp=2, dp=1))
    # MoE: the expert layout counts too (a dense or EP1 layout records no ep / etp).
    with pytest.raises(ConfigError, match=r"ep=2, etp=1, this run has tp=1, pp=1, vpp=None, ep=1, etp=1"):
        check_optimizer_layout("step_3", "dp_reshardable", dict(saved, ep=2, etp=1), saved)

def test_only_extra_state_keys_may_differ_between_a_checkpoint_and_the_model():
    from megatron_dpo.checkpoint.dist import key_mismatch

    te_only = {"decoder.layers.self_attention.core_attention._extra_state"}
    local_only = {"decoder.layers.self_attention.linear_qkv._extra_state/shard_0_4"}
    optimizer = {"optimizer.state.exp_avg.output_layer.weight"}
    assert key_mismatch(te_only, local_only, loads_optimizer=False, adapters_only=False) is None
    assert key_mismatch(optimizer, set(), loads_optimizer=False, adapters_only=False) is None
    assert key_mismatch({"output_layer.weight"}, set(), loads_optimizer=False, adapters_only=True) is None
    problem = key_mismatch(optimizer | te_only, {"decoder.layers.self_attention.q_layernorm.weight"},
                           loads_optimizer=True, adapters_only=False)
    assert problem.startswith("1 key(s) this model has are not in the checkpoint: "
                              "decoder.layers.self_attention.q_layernorm.weight; 1 key(s) of the checkpoint have no "
                              "place in this model: optimizer.state.exp_avg.output_layer.weight.")


def test_optimizer_state_is_rekeyed_when_the_moe_optimizer_chain_changes_length():
    """EP2 saves two chained megatron optimizers ({0: .., 1: ..} in common.pt), EP1 loads into one (and back):
    the group settings become this run's, the common step count stays the saved one."""
    from types import SimpleNamespace

    from megatron_dpo.checkpoint.dist import _for_this_chain, _other_chain_entry

    def inner(*group_settings):
        return SimpleNamespace(optimizer=SimpleNamespace(param_groups=[dict(s, params=["live"]) for s in group_settings]))

    saved_groups = [{"wd_mult": 1.0, "is_expert_parallel": True, "lr": 9.0}]
    # EP1 loading EP2's: this run's request (state, params) beside common.pt's two entries.
    loaded = {"state": {0: "moments"}, "param_groups": [{"params": [0, 1]}],
              0: {"state": {"common_step": 7}, "param_groups": saved_groups}, 1: {"state": {"common_step": 7}}}
    ep1 = [inner({"wd_mult": 1.0, "is_expert_parallel": False, "lr": 0.1})]
    assert _other_chain_entry(loaded, ep1) is loaded[0]
    state = _for_this_chain(loaded, ep1)
    assert state == {"state": {0: "moments", "common_step": 7},
                     "param_groups": [{"wd_mult": 1.0, "is_expert_parallel": False, "lr": 0.1, "params": [0, 1]}]}
    # EP2 loading EP1's: the request's two entries beside common.pt's single one.
    loaded = {"state": {"common_step": 5}, "param_groups": saved_groups,
              0: {"state": {0: "dense"}, "param_groups": [{"params": [0]}]},
              1: {"state": {1: "experts"}, "param_groups": [{"params": [1]}]}}
    ep2 = [inner({"wd_mult": 1.0, "is_expert_parallel": False}), inner({"wd_mult": 1.0, "is_expert_parallel": True})]
    state = _for_this_chain(loaded, ep2)
    assert sorted(state) == [0, 1] and state[1]["state"] == {1: "experts", "common_step": 5}
    assert state[1]["param_groups"] == [{"wd_mult": 1.0, "is_expert_parallel": True, "params": [1]}]
    same = {0: {"state": {}, "param_groups": []}, 1: {"state": {}, "param_groups": []}}
    assert _other_chain_entry(same, ep2) is None and _for_this_chain(same, ep2) is same
