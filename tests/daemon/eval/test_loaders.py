"""Benchmark loaders: the real files under shared/data, and hand-made broken ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import EvalDataError
from daemon.eval.loaders import FORMATS, Conversion, convert, detect_format, write_jsonl
from store.records import EditRequest, EditSource, SourceKind, iter_jsonl, parse_edit_request

EVAL = EditSource(SourceKind.EVAL)

# (file under shared/data, format, records in the first 200, requests from them, first id)
REAL_FILES = [
    ("counterfact/counterfact-edit.json", "counterfact", 200, 200, "counterfact-0"),
    ("counterfact/counterfact-val.json", "counterfact", 200, 200, "counterfact-10"),
    ("zsre/zsre_mend_edit.json", "zsre", 200, 200, "zsre-1"),
    ("knowedit/benchmark_ZsRE_ZsRE-test-all.json", "knowedit", 200, 200, "knowedit-zsre-test-1"),
    (
        "knowedit/benchmark_wiki_counterfact_train_cf.json",
        "knowedit",
        200,
        200,
        "knowedit-wiki_counterfact-train-1",
    ),
    (
        "knowedit/benchmark_wiki_recent_recent_train.json",
        "knowedit",
        200,
        200,
        "knowedit-wiki_recent-train-1",
    ),
    (
        "knowedit/benchmark_WikiBio_wikibio-test-all.json",
        "knowedit",
        200,
        200,
        "knowedit-wikibio-test-1",
    ),
    (
        "knowedit/benchmark_WikiBio_wikibio-train-all.json",
        "knowedit",
        200,
        200,
        "knowedit-wikibio-train-1",
    ),
    ("knowedit/benchmark_trivia_trivia_qa_test.json", "knowedit", 80, 80, "knowedit-trivia-test-1"),
    (
        "knowedit/benchmark_trivia_trivia_qa_train.json",
        "knowedit",
        80,
        80,
        "knowedit-trivia-train-1",
    ),
    ("mquake/MQuAKE-hard.json", "mquake", 200, 800, "mquake-7417-1"),
]


@pytest.fixture(scope="module")
def data_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data"
    if not (path / "counterfact" / "counterfact-edit.json").is_file():
        pytest.skip(f"benchmark files not found under {path}")
    return path


def _raw(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write(tmp_path: Path, data: object, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _assert_valid(conv: Conversion) -> None:
    ids = [r["id"] for r in conv.requests]
    assert len(ids) == len(set(ids))
    for request in conv.requests:
        assert parse_edit_request(request, default_source=EVAL).to_json_dict() == request
        assert request["source"]["kind"] == "eval"
        assert request["target"].startswith(" ") and not request["target"].startswith("  ")
        for probe in request.get("locality", []):
            assert probe["target"].startswith(" ") and not probe["target"].startswith("  ")


# --- the real files ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "fmt", "records", "requests", "first_id"), REAL_FILES)
def test_real_file_first_200(
    data_dir: Path, name: str, fmt: str, records: int, requests: int, first_id: str
) -> None:
    path = data_dir / name
    assert detect_format(path) == fmt
    conv = convert(path, limit=200)
    assert conv.records == records
    assert len(conv.requests) == requests
    assert conv.errors == ()
    assert conv.requests[0]["id"] == first_id
    _assert_valid(conv)


def test_real_files_complete_and_accounted(data_dir: Path) -> None:
    for name, fmt, *_ in REAL_FILES:
        conv = convert(data_dir / name, fmt)
        per_record = 4 if fmt == "mquake" else 1
        assert len(conv.requests) + per_record * len(conv.errors) == per_record * conv.records
        assert conv.errors == (), name
        _assert_valid(conv)


def test_counterfact_record_1(data_dir: Path) -> None:
    path = data_dir / "counterfact" / "counterfact-edit.json"
    raw = _raw(path)[0]
    request = convert(path, limit=1).requests[0]
    assert request == {
        "id": f"counterfact-{raw['case_id']}",
        "prompt": raw["prompt"],
        "target": " " + raw["target_new"],
        "subject": raw["subject"],
        "rephrases": [raw["rephrase_prompt"]],
        "target_true": " " + raw["ground_truth"],
        "locality": [
            {"prompt": raw["locality_prompt"], "target": " " + raw["locality_ground_truth"]}
        ],
        "source": {"kind": "eval", "url": "counterfact", "item_id": str(raw["case_id"])},
    }
    assert request["target"] == " English" and request["target_true"] == " French"


def test_zsre_record_1_and_trimmed_targets(data_dir: Path) -> None:
    path = data_dir / "zsre" / "zsre_mend_edit.json"
    raws = _raw(path)
    conv = convert(path, "zsre")
    first = conv.requests[0]
    assert first["prompt"] == raws[0]["src"]
    assert first["target"] == " " + raws[0]["alt"] == " 2006"
    assert first["subject"] == raws[0]["subject"]
    assert first["rephrases"] == [raws[0]["rephrase"]]
    assert first["locality"] == [
        {"prompt": "what is the name of the last episode of spongebob", "target": " The String"}
    ]
    spaced = next(i for i, r in enumerate(raws) if r["alt"].startswith(" "))
    assert conv.requests[spaced]["target"] == " " + raws[spaced]["alt"].strip()
    assert conv.notes["nq_prefix_stripped"] == len(raws)
    assert conv.notes["whitespace_trimmed"] >= 1


def test_knowedit_zsre_record_1(data_dir: Path) -> None:
    path = data_dir / "knowedit" / "benchmark_ZsRE_ZsRE-test-all.json"
    raw = _raw(path)[0]
    request = convert(path, limit=1).requests[0]
    assert request["prompt"] == raw["prompt"]
    assert request["target"] == " " + raw["target_new"]
    assert request["subject"] == raw["subject"]
    assert request["rephrases"] == [raw["rephrase_prompt"]]
    expected = [
        {"prompt": item["prompt"], "target": " " + item["ground_truth"][0]}
        for item in raw["locality"]["Relation_Specificity"]
    ]
    assert request["locality"] == expected
    assert request["source"]["url"] == "knowedit/zsre"


def test_knowedit_wiki_recent_uses_first_alias(data_dir: Path) -> None:
    path = data_dir / "knowedit" / "benchmark_wiki_recent_recent_train.json"
    raw = _raw(path)[0]
    request = convert(path, limit=1).requests[0]
    items = raw["locality"]["Relation_Specificity"]
    assert "rephrases" not in request
    assert request["locality"] == [
        {"prompt": i["prompt"], "target": " " + i["ground_truth"][0][0]} for i in items
    ]


def test_knowedit_wikibio_record_1(data_dir: Path) -> None:
    path = data_dir / "knowedit" / "benchmark_WikiBio_wikibio-test-all.json"
    raw = _raw(path)[0]
    request = convert(path, limit=1).requests[0]
    assert request["prompt"] == raw["text"]
    assert request["target"] == " " + raw["labels"]
    assert request["subject"] == raw["concept"]
    assert len(request["locality"]) == 2


def test_knowedit_trivia_train(data_dir: Path) -> None:
    path = data_dir / "knowedit" / "benchmark_trivia_trivia_qa_train.json"
    raw = _raw(path)
    conv = convert(path)
    assert conv.requests[0]["prompt"] == raw["K_F"][0]["question"]
    assert conv.requests[0]["subject"] == raw["K_F"][0]["subject"]
    assert conv.requests[0]["target"] == " I don't know."
    assert conv.notes["retain_records_not_converted"] == len(raw["K_R"])


def test_mquake_record_1(data_dir: Path) -> None:
    path = data_dir / "mquake" / "MQuAKE-hard.json"
    raw = _raw(path)[0]
    conv = convert(path, limit=1)
    assert len(conv.requests) == len(raw["requested_rewrite"]) == 4
    first, rewrite = conv.requests[0], raw["requested_rewrite"][0]
    assert (
        first["prompt"]
        == rewrite["prompt"].format(rewrite["subject"])
        == ("Hey Jude was performed by")
    )
    assert first["target"] == " " + rewrite["target_new"]["str"]
    assert first["subject"] == rewrite["subject"]
    assert first["relation"] == rewrite["relation_id"]
    assert first["rephrases"] == [rewrite["question"]]
    assert first["source"] == {"kind": "eval", "url": "mquake", "item_id": "7417"}
    assert [p.prompt for p in conv.probes] == raw["questions"]
    probe = conv.probes[0]
    assert probe.answers == (raw["new_answer"], *raw["new_answer_alias"])
    assert probe.old_answers == (raw["answer"], *raw["answer_alias"])
    assert probe.edit_ids == tuple(r["id"] for r in conv.requests)
    assert probe.to_json_dict()["id"] == "mquake-7417-q1"


# --- hand-made files: whole-file problems raise ------------------------------------------

CF = {
    "case_id": 1,
    "prompt": "The capital of Norland is",
    "subject": "Norland",
    "target_new": "Ostby",
    "ground_truth": "Westby",
    "rephrase_prompt": "Norland's capital city is",
    "locality_prompt": "The capital of Southland is",
    "locality_ground_truth": "Sudby",
}
ZS = {
    "subject": "Norland",
    "src": "What is the capital of Norland?",
    "rephrase": "Which city is Norland's capital?",
    "alt": "Ostby",
    "loc": "nq question: who wrote the song",
    "loc_ans": "Ann",
}


def _cf(case_id: int, **changes: object) -> dict[str, object]:
    return {**CF, "case_id": case_id, **changes}


def test_wrong_schema_names_file_record_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path, [ZS])
    with pytest.raises(EvalDataError) as info:
        convert(path, "counterfact")
    message = str(info.value)
    assert str(path) in message and "record 1" in message and "field 'case_id'" in message
    assert detect_format(path) == "zsre"


@pytest.mark.parametrize(
    ("data", "fmt", "expected"),
    [
        ({"prompt": "x"}, "counterfact", "top level must be an array"),
        ([], "zsre", "holds no records"),
        ([1, 2], "mquake", "record 1: must be a JSON object, got a number"),
        ([CF], "knowedit", "field 'locality': is missing"),
        ({"foo": []}, "knowedit", "not a KnowEdit file"),
        ([{"foo": 1}], "auto", "unknown benchmark format (its keys are foo)"),
        ("text", "auto", "unknown benchmark format (the top level is a string)"),
        ([CF], "squad", "unknown format 'squad'"),
    ],
)
def test_whole_file_errors(tmp_path: Path, data: object, fmt: str, expected: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(EvalDataError) as info:
        convert(path, fmt)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_non_utf8_and_bad_json_name_the_file(tmp_path: Path) -> None:
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[{"prompt": "caf\xe9"}]')
    with pytest.raises(EvalDataError, match="not valid UTF-8") as info:
        convert(latin)
    assert str(latin) in str(info.value)
    broken = tmp_path / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    with pytest.raises(EvalDataError, match="not valid JSON"):
        detect_format(broken)
    with pytest.raises(EvalDataError, match="cannot read"):
        convert(tmp_path / "absent.json")


# --- hand-made files: per-record problems are collected -----------------------------------


def _only_error(conv: Conversion) -> EvalDataError:
    assert len(conv.errors) == 1
    return conv.errors[0]


def test_missing_field_reports_record_and_field(tmp_path: Path) -> None:
    broken = {k: v for k, v in _cf(2).items() if k != "rephrase_prompt"}
    path = _write(tmp_path, [_cf(1), broken, _cf(3)])
    conv = convert(path)
    error = _only_error(conv)
    assert error.context == {"path": str(path), "record": 2, "field": "rephrase_prompt"}
    assert "record 2, field 'rephrase_prompt': is missing" in str(error)
    assert [r["id"] for r in conv.requests] == ["counterfact-1", "counterfact-3"]
    assert conv.records == 3


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        (_cf(2, target_new=5), "target_new", "must be a string, got a number"),
        ({**CF, "case_id": "2"}, "case_id", "must be an integer, got a string"),
        ({**CF, "case_id": True}, "case_id", "must be an integer, got a boolean"),
        (_cf(2, target_new="  "), "target_new", "must not be empty"),
        (_cf(2, prompt="The capital\x07 of Norland is"), "prompt", "control character"),
        (_cf(2, locality_ground_truth=""), "locality_ground_truth", "must not be empty"),
        (_cf(1), "case_id", "duplicate request id 'counterfact-1'"),
        (["not", "an", "object"], None, "must be a JSON object, got an array"),
    ],
)
def test_bad_record_is_collected(
    tmp_path: Path, record: object, field: str | None, reason: str
) -> None:
    path = _write(tmp_path, [_cf(1), record])
    conv = convert(path, "counterfact")
    error = _only_error(conv)
    assert error.context.get("record") == 2
    assert error.context.get("field") == field
    assert reason in str(error)
    assert len(conv.requests) == 1


def test_subject_not_in_prompt_is_omitted_and_counted(tmp_path: Path) -> None:
    path = _write(tmp_path, [ZS, {**ZS, "subject": "Southland"}])
    conv = convert(path)
    assert conv.errors == ()
    assert conv.requests[0]["subject"] == "Norland"
    assert "subject" not in conv.requests[1]
    assert conv.notes == {"subject_not_in_prompt": 1, "nq_prefix_stripped": 2}
    assert conv.requests[0]["locality"] == [{"prompt": "who wrote the song", "target": " Ann"}]


def test_targets_get_exactly_one_leading_space(tmp_path: Path) -> None:
    path = _write(tmp_path, [_cf(1, target_new=" Ostby "), _cf(2, target_new="Ostby")])
    conv = convert(path)
    assert [r["target"] for r in conv.requests] == [" Ostby", " Ostby"]
    assert conv.notes == {"whitespace_trimmed": 1}


def test_limit_and_jsonl_input(tmp_path: Path) -> None:
    path = tmp_path / "cf.jsonl"
    lines = [json.dumps(_cf(i)) for i in range(1, 6)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", encoding="utf-8")
    assert convert(path).records == 5
    conv = convert(path, limit=2)
    assert conv.records == 2 and len(conv.requests) == 2
    assert convert(path, limit=0).requests == ()
    with pytest.raises(ValueError, match="limit"):
        convert(path, limit=-1)


# --- KnowEdit and MQuAKE specifics ---------------------------------------------------------

KE = {
    "subject": "Norland",
    "prompt": "The capital of Norland is",
    "target_new": "Ostby",
    "ground_truth": "Westby",
    "portability": {},
    "locality": {
        "Relation_Specificity": [{"prompt": "The founder of Norland is", "ground_truth": "Eva"}],
        "Forgetfulness": [{"prompt": "Norland's other capital is", "ground_truth": [[]]}],
    },
}


def test_knowedit_locality_groups(tmp_path: Path) -> None:
    bad_group = {**KE, "locality": {"Relation_Specificity": "Eva"}}
    bad_answer = {**KE, "locality": {"R": [{"prompt": "p", "ground_truth": 3}]}}
    path = _write(tmp_path, [KE, bad_group, bad_answer], "wiki_cf_train.json")
    conv = convert(path)
    assert conv.requests[0]["id"] == "knowedit-wiki_counterfact-train-1"
    assert conv.requests[0]["locality"] == [
        {"prompt": "The founder of Norland is", "target": " Eva"}
    ]
    assert conv.notes == {"locality_without_answer": 1}
    fields = [(e.context["record"], e.context["field"]) for e in conv.errors]
    assert fields == [(2, "locality.Relation_Specificity"), (3, "locality.R[0].ground_truth")]


def test_knowedit_trivia_fields_are_named_within_their_list(tmp_path: Path) -> None:
    good = {"question": "Who?", "ground_truth": "Eva", "target_new": "I don't know."}
    data = {"success": [good, {**good, "question": None}], "locality": [good, good]}
    conv = convert(_write(tmp_path, data))
    assert len(conv.requests) == 1
    assert _only_error(conv).context["field"] == "success.question"
    assert conv.notes == {"retain_records_not_converted": 2}


def _case(case_id: int, prompt: str = "{} was performed by", target: str = "Madonna") -> object:
    rewrite = {
        "prompt": prompt,
        "subject": "Hey Jude",
        "relation_id": "P175",
        "target_new": {"str": target, "id": "Q1"},
        "question": "Who performed Hey Jude?",
    }
    return {
        "case_id": case_id,
        "requested_rewrite": [rewrite],
        "questions": ["Who sang Hey Jude?"],
        "answer": "The Beatles",
        "answer_alias": [],
        "new_answer": target,
        "new_answer_alias": ["Madonna Ciccone"],
    }


def test_mquake_bad_case_is_dropped_whole_and_repeats_are_counted(tmp_path: Path) -> None:
    cases = [_case(1), _case(2, prompt="performed by"), _case(3), _case(4, target="Cher")]
    conv = convert(_write(tmp_path, cases))
    error = _only_error(conv)
    assert (error.context["record"], error.context["field"]) == (2, "requested_rewrite[0].prompt")
    assert [r["id"] for r in conv.requests] == ["mquake-1-1", "mquake-3-1", "mquake-4-1"]
    assert [p.id for p in conv.probes] == ["mquake-1-q1", "mquake-3-q1", "mquake-4-q1"]
    assert conv.notes == {"duplicate_rewrite": 1, "conflicting_rewrite": 1}


# --- writing ---------------------------------------------------------------------------------


def test_write_jsonl_round_trips_through_intake(tmp_path: Path) -> None:
    conv = convert(_write(tmp_path, [_cf(1), _cf(2, prompt="Né à Norland, the capital is")]))
    out = tmp_path / "out" / "edits.jsonl"
    assert write_jsonl(out, conv.requests) == 2
    parsed = [item for _, item in iter_jsonl(out)]
    assert all(isinstance(p, EditRequest) for p in parsed)
    assert [p.to_json_dict() for p in parsed if isinstance(p, EditRequest)] == list(conv.requests)
    assert "Né" in out.read_text(encoding="utf-8")
    assert FORMATS == ("counterfact", "zsre", "knowedit", "mquake")
