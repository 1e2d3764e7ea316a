"""Every input format trains or validates end to end, under the rpo_sq loss,
whose ground-truth rewards ride from the files into the loss: NeMo RL records
in a JSON array (train), chat JSONL, string parquet and a NeMo RL
datasets.save_to_disk directory (three named validation sets holding the same
pairs, so their metrics agree exactly); prompts truncated with keep_start."""

import json
import os

import pytest

from tests.conftest import REPO, run_dpo

NUM_TRAIN, NUM_VAL = 32, 16


def demo_pairs(split, count):
    with open(os.path.join(REPO, "data", "demo", f"{split}.jsonl")) as handle:
        return [json.loads(line) for line in handle][:count]


def question(pair):
    return pair["prompt"].split("\n")[1]  # "<|user|>\n{question}\n<|assistant|>\n"


def nemo_record(pair, rewards):
    def completion(text):
        return [{"role": "assistant", "content": text}]
    return {"context": [{"role": "user", "content": question(pair)}],
            "completions": [{"rank": 1, "completion": completion(pair["rejected"])},
                            {"rank": 0, "completion": completion(pair["chosen"])}], **rewards}


def chat_record(pair, rewards):
    return {"prompt": [{"role": "user", "content": question(pair)}], "chosen": pair["chosen"],
            "rejected": {"role": "assistant", "content": pair["rejected"]}, **rewards}


def string_record(pair, rewards):
    # The tiny chat template ends a turn with "\n": the same text as the chat forms.
    return dict(pair, chosen=pair["chosen"] + "\n", rejected=pair["rejected"] + "\n", **rewards)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("formats")
    train_rewards, val_rewards = {"chosen_reward": 1.0, "rejected_reward": 0.0}, {"chosen_reward": 2, "rejected_reward": 0.5}
    val = demo_pairs("val", NUM_VAL)
    (root / "train.json").write_text(json.dumps([nemo_record(p, train_rewards) for p in demo_pairs("train", NUM_TRAIN)]))
    (root / "val_chat.jsonl").write_text("".join(json.dumps(chat_record(p, val_rewards)) + "\n" for p in val))
    datasets.Dataset.from_list([string_record(p, val_rewards) for p in val]).to_parquet(str(root / "val.parquet"))
    datasets.Dataset.from_list([nemo_record(p, val_rewards) for p in val]).save_to_disk(str(root / "val_nemo"))
    return root


def test_every_format_trains_and_validates_with_rpo_sq(tmp_path, data_files):
    records, result = run_dpo(tmp_path, 1, [
        f"data.train_data_path={data_files / 'train.json'}", f"data.val_data_path={data_files / 'val_chat.jsonl'}",
        f"data.val_data_paths.parquet={data_files / 'val.parquet'}",
        f"data.val_data_paths.nemo_dir={data_files / 'val_nemo'}",
        "loss_fn.preference_loss=rpo_sq", "dpo.max_num_steps=2", "checkpointing.enabled=false",
        "dpo.val_at_start=true", "dpo.val_at_end=true", "dpo.val_global_batch_size=16",
        "policy.max_total_sequence_length=40", "data.truncation_mode=keep_start",
    ])
    by_split = {}
    for record in records:
        by_split.setdefault(record["split"], []).append(record)
    assert sorted(by_split) == ["train", "val", "val/nemo_dir", "val/parquet"]
    # Policy == reference before the first update: rpo_sq = (gt gap)^2.
    assert by_split["train"][0]["loss"] == pytest.approx(1.0, abs=1e-6)
    for split in ("val", "val/parquet", "val/nemo_dir"):
        assert [r["step"] for r in by_split[split]] == [0, 2]
        assert by_split[split][0]["loss"] == pytest.approx(2.25, abs=1e-6)
    # Both chat forms render through the template alone (as TRL: no BOS or EOS
    # added), so they score the same tokens; the plain strings get BOS + EOS.
    for mine, chat in zip(by_split["val/nemo_dir"], by_split["val"]):
        assert {k: v for k, v in mine.items() if k != "split"} == {k: v for k, v in chat.items() if k != "split"}
    assert "data.truncation_mode=keep_start" in result.stdout and "train data: 0 pairs dropped and" in result.stdout


def test_loss_needing_rewards_on_data_without_them_stops_early(tmp_path):
    records, result = run_dpo(tmp_path, 1, ["loss_fn.preference_loss=rpo_fwd_kl"], check=False)
    assert result.returncode != 0 and not records
    assert "loss_fn.preference_loss=rpo_fwd_kl needs ground-truth rewards" in result.stderr
    assert "train.jsonl has no 'chosen_reward'" in result.stderr and "]: Traceback" not in result.stderr
