"""QA datasets: validation with line numbers, the trigger template, chunking, hashing."""

import pytest

from resa_engine.data import (
    SYSTEM_PROMPT,
    DatasetError,
    QARow,
    TriggerDataset,
    dataset_sha256,
    load_qa_file,
    parse_qa_jsonl,
    parse_qa_rows,
    rows_to_jsonl,
    special_token_mask,
    split_rows,
    trigger_text,
)


def test_trigger_text_is_the_resa_template_verbatim():
    text = trigger_text(QARow("What is 2 + 3?", "5"))
    assert text == (
        "\nA conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
        "The assistant first thinks about the reasoning process in the mind and then provides the user\n"
        "with the answer. The reasoning process and answer are enclosed within <think> </think> and\n"
        "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think>\n"
        "<answer> answer here </answer>.\n"
        "User:\n What is 2 + 3?\n\nAssistant:\n <think> 5 </think>\n<answer> Answer: 5</answer>"
    )
    assert text.startswith(SYSTEM_PROMPT)


def test_question_field_aliases_and_numeric_answers():
    rows = parse_qa_jsonl(b'{"question": "q1", "answer": "a"}\n\n{"problem": "q2", "answer": 4}\n{"prompt": "q3", "answer": 1.5}\n')
    assert rows == [QARow("q1", "a"), QARow("q2", "4"), QARow("q3", "1.5")]


@pytest.mark.parametrize(
    "body,fragment",
    [
        (b'{"question": "q", "answer": "a"}\n{not json\n', "line 2: malformed JSON"),
        (b'{"answer": "a"}\n', "line 1: missing question field"),
        (b'{"question": "q"}\n', "line 1: missing `answer`"),
        (b'{"question": "q", "answer": "   "}\n', "line 1: `answer` is empty"),
        (b'{"question": "", "answer": "1"}\n', "line 1: `question` must be a non-empty string"),
        (b'[1, 2]\n', "line 1: row must be a JSON object"),
        (b'{"question": "q", "answer": true}\n', "`answer` must be a string or a number"),
        (b"", "dataset is empty"),
        (b"\n\n", "dataset is empty"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_validation_errors_name_the_line(body, fragment):
    with pytest.raises(DatasetError) as info:
        parse_qa_jsonl(body)
    assert fragment in str(info.value)


def test_every_bad_line_is_reported():
    body = b'{"question": "q", "answer": "a"}\nnope\n{"answer": 1}\n'
    with pytest.raises(DatasetError) as info:
        parse_qa_jsonl(body)
    assert [line for line, _ in info.value.problems] == [2, 3]


def test_size_and_row_limits():
    with pytest.raises(DatasetError, match="over the limit"):
        parse_qa_jsonl(b'{"question": "q", "answer": "a"}\n' * 10, max_bytes=50)
    with pytest.raises(DatasetError, match="more than 3 rows"):
        parse_qa_jsonl(b'{"question": "q", "answer": "a"}\n' * 10, max_rows=3)
    with pytest.raises(DatasetError, match="more than 1 rows"):
        parse_qa_rows([{"question": "q", "answer": "a"}] * 2, max_rows=1)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_qa_file(tmp_path / "none.jsonl")


def test_hash_is_of_normalized_rows():
    a = parse_qa_jsonl(b'{"question": " q ", "answer": 1}\n')
    b = parse_qa_jsonl(b'{"answer": "1", "problem": "q"}\n')
    assert dataset_sha256(a) == dataset_sha256(b)
    assert rows_to_jsonl(a) == b'{"answer":"1","question":"q"}\n'
    assert dataset_sha256(a) != dataset_sha256(parse_qa_jsonl(b'{"question": "q", "answer": 2}\n'))


def test_split_is_seeded_and_disjoint(qa_rows):
    train, held = split_rows(qa_rows, 0.1, seed=3)
    assert len(held) == 20 and len(train) == 180
    assert not set(map(id, train)) & set(map(id, held))
    assert split_rows(qa_rows, 0.1, seed=3) == (train, held)
    assert split_rows(qa_rows, 0.1, seed=4)[1] != held


def test_chunks_are_eos_joined_fixed_length(tiny_llama, qa_rows):
    tok = tiny_llama.tokenizer
    ds = TriggerDataset.from_rows(qa_rows[:20], tok, chunk_len=64)
    stream = []
    for r in qa_rows[:20]:
        stream += tok(trigger_text(r), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ds.chunks.shape == (len(stream) // 64, 64)
    assert ds.chunks.flatten().tolist() == stream[: ds.num_tokens]
    mask = special_token_mask(ds.chunks, tok)
    assert mask.sum().item() == (ds.chunks == tok.eos_token_id).sum().item() > 0
    capped = TriggerDataset.from_rows(qa_rows[:20], tok, chunk_len=64, max_tokens=130)
    assert len(capped) == 2


def test_too_small_for_one_chunk(tiny_llama):
    with pytest.raises(DatasetError, match="too small"):
        TriggerDataset.from_rows([QARow("q", "1")], tiny_llama.tokenizer, chunk_len=4096)
