"""bench/qat_from_scratch.py (QAT from scratch) at its smallest setting: every row is produced."""

import importlib.util
import json
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "bench" / "qat_from_scratch.py"


def load_study():
    spec = importlib.util.spec_from_file_location("qat_from_scratch", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study():
    return load_study()


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small jsonl corpus (every 20th document is held out), so the tokenizer trains fast."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly brew".split()
    path = tmp_path / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(80):
            text = " ".join(words[(i + j * 7) % len(words)] for j in range(120))
            f.write(json.dumps({"text": f"document {i}: {text}."}) + "\n")
    return path


def test_smallest_study_has_every_row(study, corpus, tmp_path, capsys):
    out = tmp_path / "study"
    code = study.main(["--preset", "tiny", "--steps", "2", "--seeds", "0", "--eval-every", "0",
                       "--eval-batches", "1", "--seq-len", "32", "--batch-size", "2",
                       "--int4-group-size", "32", "--data", str(corpus), "--out", str(out)])
    assert code == 0
    expected = [row.label for row in study.eval_rows(32)]
    # Every training mode and every PTQ format appears once.
    assert len(expected) == 15 and len(set(expected)) == 15
    table = (out / "results.md").read_text()
    assert table == capsys.readouterr().out
    every_model, qat_vs_ptq = table.split("\n\n")
    lines = every_model.strip().splitlines()
    assert lines[0].startswith("| model | eval loss |")
    assert [line.split(" | ")[0].removeprefix("| ") for line in lines[2:]] == expected
    formats = [line.split(" | ")[0].removeprefix("| ") for line in
               qat_vs_ptq.strip().splitlines()[2:]]
    assert formats == ["int8 weight-only", "w8a8", "fp8 e4m3 weights (QAT delayed)",
                       "fp8 e4m3 weights (QAT current)", "int4 g32"]

    results = json.loads((out / "results.json").read_text())
    assert [row["label"] for row in results["rows"]] == expected
    for row in results["rows"]:
        assert len(row["eval_loss"]["per_seed"]) == 1
        assert row["eval_loss"]["sd"] == 0.0
    assert results["rows"][0]["gap_to_float"]["mean"] == 0.0  # the reference itself
    runs = results["runs"]["0"]
    assert [Path(r).name for r in runs] == [f"{m}-seed0" for m in study.TRAIN_MODES]
    for run in runs:
        assert len((Path(run) / "metrics.jsonl").read_text().splitlines()) == 2
    quant = json.loads((Path(runs[-1]) / "config.json").read_text())["quant"]
    assert quant["mode"] == "int4w" and quant["group_size"] == 32
    assert (out / "loss_curves.png").read_bytes().startswith(b"\x89PNG")

    # The doc's generated block comes from results.json; the text around it is kept.
    doc = tmp_path / "study.md"
    doc.write_text("# intro\n<!-- qat-study:start -->\nold\n<!-- qat-study:end -->\noutro\n")
    assert study.main(["--out", str(out), "--update-doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# intro\n") and text.endswith("outro\n") and "old" not in text
    assert every_model in text and "(qat-study.png)" in text
    assert (tmp_path / "qat-study.png").read_bytes() == (out / "loss_curves.png").read_bytes()


def test_gaps_are_paired_per_seed(study):
    rows = [study.EvalRow("float", "float"), study.EvalRow("q", "float", "int8")]
    losses = {"float": {0: 3.0, 1: 4.0}, "q": {0: 3.5, 1: 4.1}}
    summary = study.summarize(rows, losses, [0, 1])
    assert summary[1]["gap_to_float"]["per_seed"] == pytest.approx([0.5, 0.1])
    assert summary[1]["gap_to_float"]["mean"] == pytest.approx(0.3)
    assert summary[1]["eval_loss"]["sd"] == pytest.approx(0.6 / 2**0.5)  # sample sd of 3.5, 4.1


def test_existing_study_folder_is_refused(study, tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert study.main(["--preset", "tiny", "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "already holds a study" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["", "{data}", "{mine}", "{a_file}"])
def test_out_never_overwrites_what_the_study_did_not_create(study, tmp_path, capsys, out):
    data = tmp_path / "corpus.txt"
    data.write_text("text")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text("precious")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("precious")
    out = out.format(data=data, mine=mine, a_file=a_file)
    assert study.main(["--preset", "tiny", "--steps", "1", "--data", str(data),
                       "--out", out]) == 2
    assert capsys.readouterr().err.startswith("error: --out")
    assert (mine / "results.json").read_text() == "precious"
    assert a_file.read_text() == "precious" and data.read_text() == "text"
