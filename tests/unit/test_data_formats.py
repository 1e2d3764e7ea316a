"""Input formats: string / chat / NeMo RL records, rewards, file sources, chat
rendering; every bad input is a DataError naming file, line (or row) and key."""

import json
from pathlib import Path

import pytest

from megatron_dpo.config.schema import DataConfig
from megatron_dpo.data import DataError, PreferencePair, build_dataset, load_pairs, render_chat

ROOT = Path(__file__).resolve().parents[2]
TINY_TOKENIZER = ROOT / "megatron_dpo/models/presets/tiny_tokenizer"
GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no"}
USER = [{"role": "user", "content": "hi"}]


def write(tmp_path, text, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_jsonl(tmp_path, records, name="pairs.jsonl"):
    return write(tmp_path, "".join(json.dumps(r) + "\n" for r in records), name)


def answer(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))


# ---------------------------------------------------------------- string records
def test_load_pairs_skips_blank_lines_and_uses_configured_keys(tmp_path):
    path = write(tmp_path, "\n" + json.dumps(GOOD) + "\n\n" + json.dumps({"q": "p", "good": "a", "bad": "b"}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:4: missing key 'prompt'"):
        load_pairs(path, DataConfig())
    path = write(tmp_path, json.dumps({"q": "p", "good": "a", "bad": "b"}) + "\n\n")
    cfg = DataConfig(prompt_key="q", chosen_key="good", rejected_key="bad")
    assert load_pairs(path, cfg) == [PreferencePair("p", "a", "b")]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "chosen": "a"', r":2: not valid JSON \(Expecting"),
    ('["p", "a", "b"]', r":2: expected a JSON object"),
    ('{"prompt": "p", "chosen": "a"}', r":2: missing key 'rejected' \(keys present: \['chosen', 'prompt'\]\)"),
    ('{"prompt": "p", "chosen": ["a"], "rejected": "b"}', r":2: key 'chosen' must be a string, got list"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', r":2: key 'prompt' must be a string or a list of chat"),
    ('{"prompt": "p", "chosen": "a", "rejected": "  "}', r":2: key 'rejected' is empty"),
    ('{"prompt": "p", "chosen": "a", "rejected": "a"}', r":2: 'chosen' and 'rejected' are identical"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_reward": 1}', r":2: has 'chosen_reward' but not"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_reward": "1", "rejected_reward": 0}',
     r":2: key 'chosen_reward' must be a finite number, got '1'"),
])
def test_load_pairs_errors_name_file_line_and_key(tmp_path, line, message):
    path = write(tmp_path, json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl" + message):
        load_pairs(path, DataConfig())


def test_an_empty_prompt_is_accepted_for_prompt_free_data(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path, [dict(GOOD, prompt="")])
    assert load_pairs(path, DataConfig()) == [PreferencePair("", "yes", "no")]
    (pair,) = build_dataset(path, DataConfig(), tiny_tokenizer, max_length=64).pairs
    assert pair.chosen_prompt_len == pair.rejected_prompt_len == 1  # BOS: the first completion token is scored
    assert tiny_tokenizer.decode(pair.chosen_ids[1:]) == "yes</s>"


def test_non_utf8_bytes_name_file_line_and_byte_offset(tmp_path):
    good = (json.dumps(GOOD) + "\n").encode()
    bad = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    (tmp_path / "latin1.jsonl").write_bytes(good + bad)
    offset = len(good) + bad.index(b"\xe9")
    with pytest.raises(DataError, match=rf"latin1\.jsonl:2: not UTF-8 text: byte b'\\xe9' at byte offset {offset} "
                                        r"of the file \(column 16 of the line\); save the file as UTF-8"):
        load_pairs(str(tmp_path / "latin1.jsonl"), DataConfig())
    (tmp_path / "latin1.json").write_bytes(b"[\n" + good[:-1] + b",\n" + bad + b"]\n")
    offset = 2 + len(good) + 1 + bad.index(b"\xe9")
    with pytest.raises(DataError, match=rf"latin1\.json:3: not UTF-8 text: byte b'\\xe9' at byte offset {offset} "):
        load_pairs(str(tmp_path / "latin1.json"), DataConfig())


def test_rewards_are_read_and_needed_on_every_record(tmp_path):
    rewarded = dict(GOOD, chosen_reward=2, rejected_reward=-1.5)
    assert load_pairs(write_jsonl(tmp_path, [rewarded]), DataConfig()) == [
        PreferencePair("p", "yes", "no", 2.0, -1.5)]
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: no 'chosen_reward' / 'rejected_reward', "
                                        r"but .*pairs\.jsonl:1 has them"):
        load_pairs(write_jsonl(tmp_path, [rewarded, GOOD]), DataConfig())


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl' does not exist.*data\.train_data_path"):
        load_pairs(str(tmp_path / "nope.jsonl"), DataConfig())
    with pytest.raises(DataError, match=r"empty\.jsonl holds no preference pairs"):
        load_pairs(write(tmp_path, "\n  \n", "empty.jsonl"), DataConfig())
    with pytest.raises(DataError, match=r"empty\.json holds no preference pairs"):
        load_pairs(write(tmp_path, "[]", "empty.json"), DataConfig())


# ---------------------------------------------------------------- chat and NeMo RL records
def test_chat_records_normalise_completions_to_message_lists(tmp_path):
    records = [{"prompt": USER, "chosen": answer("a"), "rejected": answer("b")[0]},
               {"prompt": USER, "chosen": "a", "rejected": "b"}]
    pairs = load_pairs(write_jsonl(tmp_path, records), DataConfig())
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(USER, answer("a"), answer("b"))] * 2


def test_nemo_rl_records_lower_rank_is_chosen(tmp_path):
    record = {"context": USER, "completions": [{"rank": 1, "completion": answer("worse")},
                                                {"rank": 0, "completion": answer("better")}]}
    assert load_pairs(write_jsonl(tmp_path, [record]), DataConfig()) == [
        PreferencePair(USER, answer("better"), answer("worse"))]


def nemo(*completions, **extra):
    return dict({"context": USER, "completions": list(completions)}, **extra)


@pytest.mark.parametrize("record, message", [
    ({"prompt": USER, "chosen": [{"role": "assistant"}], "rejected": "b"},
     r"key 'chosen' message 0 must be an object with string 'role' and 'content'"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, r"key 'prompt' must be a string or a list .* got an empty list"),
    ({"prompt": USER, "chosen": answer(" "), "rejected": "b"}, r"key 'chosen' message 0 has empty 'content'"),
    ({"prompt": USER, "chosen": "a", "rejected": answer("a")}, r"'chosen' and 'rejected' are identical"),
    ({"completions": []}, r"missing key 'context'"),
    (nemo({"rank": 0, "completion": answer("a")}), r"key 'completions' must be a list of exactly 2 .* got 1"),
    (nemo({"rank": 0, "completion": answer("a")}, {"rank": 0, "completion": answer("b")}),
     r"both completions have rank 0; a tie carries no preference"),
    (nemo({"rank": 0, "completion": answer("a")}, {"rank": "1", "completion": answer("b")}),
     r"completions\[1\]\.rank must be an integer"),
    (nemo({"rank": 0, "completion": answer("a")}, {"rank": 1}), r"completions\[1\] must be an object with keys"),
    (nemo({"rank": 0, "completion": answer("a")}, {"rank": 1, "completion": answer("a")}),
     r"the two 'completions' are identical"),
])
def test_chat_and_nemo_errors_name_line_and_key(tmp_path, record, message):
    path = write_jsonl(tmp_path, [GOOD, record])
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: " + message):
        load_pairs(path, DataConfig())


# ---------------------------------------------------------------- sources
def test_json_array_json_lines_parquet_and_dataset_dir_read_alike(tmp_path):
    import datasets

    records = [GOOD, dict(GOOD, chosen="sure")]
    expected = load_pairs(write_jsonl(tmp_path, records), DataConfig())
    array = write(tmp_path, json.dumps(records, indent=1), "array.json")
    lines = write_jsonl(tmp_path, records, "lines.json")
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "pairs.parquet"))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    for path in (array, lines, str(tmp_path / "pairs.parquet"), str(tmp_path / "saved")):
        assert load_pairs(path, DataConfig()) == expected, path


def test_source_errors_name_row_or_line(tmp_path):
    import datasets

    with pytest.raises(DataError, match=r"array\.json row 1: missing key 'rejected'"):
        load_pairs(write(tmp_path, json.dumps([GOOD, {"prompt": "p", "chosen": "a"}]), "array.json"), DataConfig())
    with pytest.raises(DataError, match=r"bad\.json:3: not valid JSON"):
        load_pairs(write(tmp_path, '[\n{"prompt": "p"},\n{oops}\n]', "bad.json"), DataConfig())
    datasets.Dataset.from_list([GOOD, dict(GOOD, chosen=None)]).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(DataError, match=r"p\.parquet row 1: key 'chosen' must be a string, got NoneType"):
        load_pairs(str(tmp_path / "p.parquet"), DataConfig())
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable parquet file"):
        load_pairs(write(tmp_path, "not parquet", "junk.parquet"), DataConfig())
    datasets.DatasetDict(train=datasets.Dataset.from_list([GOOD])).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train'\]; point .*/dd/train"):
        load_pairs(str(tmp_path / "dd"), DataConfig())
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match=r"plain_dir is a directory but not a datasets.save_to_disk directory"):
        load_pairs(str(tmp_path / "plain_dir"), DataConfig())


# ---------------------------------------------------------------- chat rendering
def test_chat_pairs_render_with_the_template_and_tokenize(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path, [{"prompt": USER, "chosen": "yes", "rejected": answer("no")}])
    (pair,) = load_pairs(path, DataConfig())
    prompt = "<|user|>\nhi\n<|assistant|>\n"
    assert render_chat(pair, tiny_tokenizer) == (prompt, prompt + "yes\n", prompt + "no\n")
    (tokens,) = build_dataset(path, DataConfig(), tiny_tokenizer, max_length=64).pairs
    # As TRL tokenizes chat (apply_chat_template): no BOS added, no EOS
    # appended; the template's "\n" ends the turn.
    assert tiny_tokenizer.decode(tokens.chosen_ids[:tokens.chosen_prompt_len]) == prompt
    assert tiny_tokenizer.decode(tokens.chosen_ids[tokens.chosen_prompt_len:]) == "yes\n"
    assert tokens.rejected_prompt_len == tokens.chosen_prompt_len


def test_chat_template_override_and_its_errors(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    pairs = load_pairs(write_jsonl(tmp_path, [{"prompt": USER, "chosen": "yes", "rejected": "no"}]), DataConfig())
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    assert render_chat(pairs[0], tokenizer)[1] == "[user] hi [assistant] yes "
    tokenizer.chat_template = None
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: a chat-form record .* no chat template; "
                                        r"set policy\.tokenizer\.chat_template"):
        render_chat(pairs[0], tokenizer)
    tokenizer.chat_template = "{{ messages | length }}"
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: the chat template does not render the prompt"):
        render_chat(pairs[0], tokenizer)
    tokenizer.chat_template = "{{ raise_exception('no assistant role') }}"
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: the chat template fails on this record"):
        render_chat(pairs[0], tokenizer)


def test_template_bos_text_is_not_doubled(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    tokenizer.chat_template = "{{ bos_token }}" + tiny_tokenizer.chat_template
    path = write_jsonl(tmp_path, [{"prompt": USER, "chosen": "yes", "rejected": "no"}])
    (pair,) = build_dataset(path, DataConfig(), tokenizer, max_length=64).pairs
    assert pair.chosen_ids[:2] == [tokenizer.bos_token_id, tokenizer("<|", add_special_tokens=False)["input_ids"][0]]
