"""The tokenized Arrow cache (data/cache.py): the same pairs as in-memory
tokenization, built once (also by two processes at once), reused on restart,
rebuilt when its inputs change, and bad data still named by file and line."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_dpo.config.schema import DataConfig
from megatron_dpo.data import DataError, build_dataset, open_tokenized, pairs_fingerprint

ROOT = Path(__file__).resolve().parents[2]
TINY_TOKENIZER = ROOT / "megatron_dpo/models/presets/tiny_tokenizer"
BUILDING = "building the tokenized cache"
USER = [{"role": "user", "content": "Name the capi"}]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))


def records(count):
    """String and chat records, with rewards, some of them too long for 24 tokens."""
    rows = []
    for i in range(count):
        rewards = {"chosen_reward": float(i), "rejected_reward": -1.0}
        if i % 3 == 2:
            rows.append({"prompt": USER, "chosen": "tal of France.", "rejected": f" of {'very ' * (i % 5)}France.",
                         **rewards})
        else:
            rows.append({"prompt": f"Question {i}: " + "why? " * (i % 7), "chosen": f"Because {i}.",
                         "rejected": "No.", **rewards})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def tuples(pairs):
    return [(p.chosen_ids, p.rejected_ids, p.chosen_prompt_len, p.rejected_prompt_len, p.chosen_reward,
             p.rejected_reward) for p in pairs]


@pytest.mark.parametrize("policy, mode", [("truncate", "keep_end"), ("truncate_sequence", "keep_start"),
                                          ("truncate_sequence", "keep_end"), ("drop", "keep_end")])
def test_cache_holds_what_in_memory_tokenization_makes(tmp_path, tokenizer, policy, mode):
    path = write_jsonl(tmp_path / "pairs.jsonl", records(40))
    cfg = DataConfig(overlength_policy=policy, truncation_mode=mode)
    expected = build_dataset(path, cfg, tokenizer, max_length=24)
    cached = open_tokenized(path, cfg, tokenizer, 24, str(tmp_path / "cache"))
    assert len(cached) == len(expected.pairs) and tuples(cached) == tuples(expected.pairs)
    assert (cached.num_dropped, cached.num_truncated) == (expected.num_dropped, expected.num_truncated)
    assert cached.num_dropped + cached.num_truncated > 0
    assert cached.fingerprint == expected.fingerprint == pairs_fingerprint(cached)
    assert tuples([cached[-1]]) == tuples(cached[len(cached) - 1:]) and cached.pairs is cached
    with pytest.raises(IndexError):
        cached[len(cached)]


def test_a_restart_reuses_the_cache_and_a_change_rebuilds_it(tmp_path, tokenizer, caplog):
    path, cache_dir = write_jsonl(tmp_path / "pairs.jsonl", records(10)), str(tmp_path / "cache")
    caplog.set_level(logging.INFO, logger="megatron_dpo.data.cache")
    first = open_tokenized(path, DataConfig(), tokenizer, 64, cache_dir)
    again = open_tokenized(path, DataConfig(), tokenizer, 64, cache_dir)
    assert caplog.text.count(BUILDING) == 1 and again.directory == first.directory
    open_tokenized(path, DataConfig(), tokenizer, 32, cache_dir)
    open_tokenized(path, DataConfig(overlength_policy="truncate_sequence"), tokenizer, 32, cache_dir)
    write_jsonl(tmp_path / "pairs.jsonl", records(11))
    assert len(open_tokenized(path, DataConfig(), tokenizer, 64, cache_dir)) == 11
    assert caplog.text.count(BUILDING) == 4
    assert len([name for name in os.listdir(cache_dir) if name.endswith(".lock")]) == 4
    assert not [name for name in os.listdir(cache_dir) if name.endswith(".tmp")]


def test_bad_data_is_named_by_file_and_line_and_nothing_is_published(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    rows = records(5)
    rows[3] = dict(rows[3], chosen=rows[3]["rejected"])
    write_jsonl(path, rows)
    cache_dir = tmp_path / "cache"
    for _ in range(2):  # a later start builds again and fails the same way
        with pytest.raises(DataError, match=r"pairs\.jsonl:4: 'chosen' and 'rejected' are identical"):
            open_tokenized(str(path), DataConfig(), tokenizer, 64, str(cache_dir))
    assert sorted(name.split(".", 1)[1] for name in os.listdir(cache_dir)) == ["error", "lock"]


def test_reference_logps_ride_in_a_side_array(tmp_path, tokenizer):
    data = open_tokenized(write_jsonl(tmp_path / "pairs.jsonl", records(3)), DataConfig(), tokenizer, 64,
                          str(tmp_path / "cache"))
    assert data[0].reference_logps is None and data.has_rewards and data[1].chosen_reward == 1.0
    data.set_reference_logps(torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.5, -6.0]]))
    assert [pair.reference_logps for pair in data] == [(-1.0, -2.0), (-3.0, -4.0), (-5.5, -6.0)]
    with pytest.raises(ValueError, match=r"shape \(2, 2\) for 3 pairs"):
        data.set_reference_logps(torch.zeros(2, 2))


RANK_SCRIPT = textwrap.dedent("""
    import logging, os, sys, time
    from transformers import AutoTokenizer
    from megatron_dpo.config.schema import DataConfig
    from megatron_dpo.data import DataError, open_tokenized

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    data_path, cache_dir, start, rank = sys.argv[1:]
    tokenizer = AutoTokenizer.from_pretrained({tok!r})
    open(f"{{start}}.{{rank}}", "w").close()
    while len([n for n in os.listdir(os.path.dirname(start)) if n.startswith(os.path.basename(start) + ".")]) < 2:
        time.sleep(0.01)  # both ranks are ready: they reach the cache together
    try:
        data = open_tokenized(data_path, DataConfig(), tokenizer, 64, cache_dir)
    except DataError as error:
        print("DataError:", error)
        sys.exit(2)
    print(len(data), data.fingerprint)
""")


def run_two_ranks(tmp_path, rows):
    """Two processes open the same data's cache at the same moment: (returncode, stdout, stderr) each."""
    data_path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(tok=str(TINY_TOKENIZER)))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    ranks = [subprocess.Popen([sys.executable, str(script), data_path, str(tmp_path / "cache"),
                               str(tmp_path / "start"), str(rank)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(2)]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    return [(rank.returncode, stdout, stderr) for rank, (stdout, stderr) in zip(ranks, outputs)]


def test_two_ranks_on_a_node_build_the_cache_once(tmp_path):
    outputs = run_two_ranks(tmp_path, records(3000))
    assert [code for code, _, _ in outputs] == [0, 0], outputs
    assert sum(stderr.count(BUILDING) for _, _, stderr in outputs) == 1, outputs
    assert outputs[0][1] == outputs[1][1] and outputs[0][1].split()[0] == "3000"


def test_two_ranks_both_report_bad_data_by_file_and_line_from_one_build(tmp_path):
    rows = records(3000)
    rows[2998] = dict(rows[2998], rejected=rows[2998]["chosen"])
    outputs = run_two_ranks(tmp_path, rows)
    assert sum(stderr.count(BUILDING) for _, _, stderr in outputs) == 1, outputs
    for code, stdout, _ in outputs:
        assert code == 2 and "pairs.jsonl:2999: 'chosen' and 'rejected' are identical" in stdout, outputs


def test_val_and_train_sets_share_a_cache_dir(tmp_path, tokenizer):
    cache_dir = str(tmp_path / "cache")
    train = open_tokenized(write_jsonl(tmp_path / "train.jsonl", records(6)), DataConfig(), tokenizer, 64,
                           cache_dir)
    val = open_tokenized(write_jsonl(tmp_path / "val.jsonl", records(4)), DataConfig(), tokenizer, 64,
                         cache_dir)
    assert (len(train), len(val)) == (6, 4) and train.directory != val.directory
