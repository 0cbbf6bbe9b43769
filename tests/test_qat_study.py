"""bench/qat_study.py: PTQ vs float fine-tune + PTQ vs QAT fine-tune from one checkpoint."""

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "bench" / "qat_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("qat_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_corpus(path: Path, shift: int) -> Path:
    """A small jsonl corpus (every 20th document is held out), so the tokenizer trains fast."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly brew".split()
    with open(path, "w") as f:
        for i in range(80):
            text = " ".join(words[(i + j * 7 + shift) % len(words)] for j in range(120))
            f.write(json.dumps({"text": f"document {i}: {text}."}) + "\n")
    return path


def tiny_study(study, tmp_path: Path, seeds: list[str], formats: list[str]) -> Path:
    out = tmp_path / "study"
    argv = ["--preset", "tiny", "--base-steps", "2", "--base-eval-every", "1", "--steps", "2",
            "--seeds", *seeds, "--formats", *formats, "--group-size", "32",
            "--eval-batches", "1", "--seq-len", "32", "--batch-size", "2",
            "--data", str(write_corpus(tmp_path / "corpus.jsonl", 0)),
            "--eval-data", str(write_corpus(tmp_path / "other.jsonl", 3)), "--out", str(out)]
    assert study.main(argv) == 0
    return out


def check_study(study, out: Path, seeds: list[str], formats: list[str]) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["formats"] == formats
    checkpoint = next((out / "base" / "checkpoints").iterdir())
    assert [p["step"] for p in results["base_curve"]] == [1, 2]
    for eval_set in ("held_out", "eval_data"):
        losses = results["losses"][eval_set]
        assert set(losses["base"]) == {"float", *formats}
        for seed in seeds:
            assert set(losses["control"][seed]) == {"float", *formats}
            for name in formats:
                assert math.isfinite(losses[f"qat-{name}"][seed])
        rows = study.summarize(results, eval_set)
        assert [r["format"] for r in rows] == formats
    # Every fine-tune starts from the base checkpoint, with its format's quantizer (or none).
    for name in ["control", *[f"qat-{f}" for f in formats]]:
        for seed in seeds:
            run = out / "runs" / f"{name}-seed{seed}"
            config = json.loads((run / "config.json").read_text())
            assert config["train"]["init_from"] == str(checkpoint)
            assert config["train"]["seed"] == int(seed) and config["train"]["steps"] == 2
            want = (study.formats(32)[name.removeprefix("qat-")].qcfg().to_dict()
                    if name != "control" else {"mode": "none"})
            assert {k: config["quant"][k] for k in want} == want
            assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert set(results["step_seconds"]) == {"control", *[f"qat-{f}" for f in formats]}
    assert (out / "study.png").read_bytes().startswith(b"\x89PNG")
    return results


def test_formats_convert_with_the_inference_op_where_there_is_one(study):
    import equinox as eqx
    import jax

    from hpllm.config import preset
    from hpllm.model import Transformer
    from hpllm.quant import (
        Fp8QATDot,
        Int4WeightOnlyDot,
        Int4WeightQATDot,
        Int8QATDot,
        W4A8Dot,
    )

    def shaped(fmt):  # shapes only: nothing is computed
        return eqx.filter_eval_shape(
            lambda: fmt.apply(Transformer(preset("tiny"), key=jax.random.key(0))))

    want = {"int8-tensor": Int8QATDot, "fp8-tensor": Fp8QATDot, "int4-channel": Int4WeightOnlyDot,
            "int4-group": Int4WeightOnlyDot, "w4a8": W4A8Dot, "int3-group": Int4WeightQATDot,
            "int2-group": Int4WeightQATDot}
    assert set(want) == set(study.FORMAT_NAMES)
    for name, fmt in study.formats(32).items():
        assert isinstance(shaped(fmt).blocks.mlp.w_down.op, want[name]), name
        assert fmt.qcfg().name == fmt.quant
    assert shaped(study.formats(32)["fp8-tensor"]).blocks.mlp.w_up.op.scaling == "current"
    assert shaped(study.formats(32)["int2-group"]).blocks.mlp.w_up.op.bits == 2
    assert shaped(study.formats(32)["int8-tensor"]).blocks.mlp.w_up.op.activations == \
        "tensor"


def test_smallest_study_runs_end_to_end(study, tmp_path, capsys):
    # One format (simulated int3: its QAT config and its evaluation); the slow test runs all.
    formats = ["int3-group"]
    out = tiny_study(study, tmp_path, ["1"], formats)
    results = check_study(study, out, ["1"], formats)
    report = (out / "results.md").read_text()
    assert report == capsys.readouterr().out == results["report"]
    assert "| int3 weights, g32 |" in report and "(one seed)" in report
    # The doc's generated block comes from results.json; the text around it is kept.
    doc = tmp_path / "doc.md"
    doc.write_text("# intro\n<!-- qat-finetune:start -->\nold\n<!-- qat-finetune:end -->\nend\n")
    assert study.main(["--out", str(out), "--update-doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# intro\n") and text.endswith("end\n") and "old" not in text
    assert report in text and "(qat-finetune.png)" in text
    assert (tmp_path / "qat-finetune.png").read_bytes() == (out / "study.png").read_bytes()


@pytest.mark.slow
def test_smallest_full_study_every_format_three_seeds(study, tmp_path):
    seeds = ["1", "2", "3"]
    out = tiny_study(study, tmp_path, seeds, list(study.FORMAT_NAMES))
    results = check_study(study, out, seeds, list(study.FORMAT_NAMES))
    for row in study.summarize(results, "held_out"):
        d = row["qat_minus_control"]
        assert d["low"] <= d["mean"] <= d["high"]


def test_differences_are_paired_per_seed_with_a_t_interval(study):
    seeds = [1, 2, 3]
    control = {"1": {"float": 3.0, "x": 3.3}, "2": {"float": 3.2, "x": 3.4},
               "3": {"float": 3.1, "x": 3.4}}
    qat = {"1": 3.1, "2": 3.3, "3": 3.2}
    results = {"settings": {"seeds": seeds, "formats": ["x"]}, "labels": {"x": "X"},
               "losses": {"held_out": {"base": {"float": 3.0, "x": 3.5}, "control": control,
                                       "qat-x": qat}}}
    (row,) = study.summarize(results, "held_out")
    diffs = [-0.2, -0.1, -0.2]  # QAT - control, seed by seed
    assert row["qat_minus_control"]["per_seed"] == pytest.approx(diffs)
    half = 4.303 * statistics.stdev(diffs) / 3 ** 0.5  # t(0.975, 2 degrees of freedom)
    assert row["qat_minus_control"]["low"] == pytest.approx(-0.5 / 3 - half)
    assert row["qat_minus_control"]["high"] == pytest.approx(-0.5 / 3 + half)
    assert row["ptq_gap_relative"] == pytest.approx(0.5 / 3.0)
    # The control's gap to its own float loss: 0.3, 0.2, 0.3; QAT wins back 0.5/3 of 0.8/3.
    assert row["recovered"] == pytest.approx(0.5 / 0.8)
    assert study.verdict(row) == "met"
    assert study.verdict({**row, "recovered": 0.4}) == "not met: recovers < half"


def test_t_interval_of_two_and_of_one_seed(study):
    low, high = study.t_interval([1.0, 3.0])
    assert (low, high) == pytest.approx((2.0 - 12.706, 2.0 + 12.706))  # sd sqrt 2, n 2
    assert all(math.isnan(v) for v in study.t_interval([1.0]))


def test_existing_study_folder_is_refused(study, tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert study.main(["--steps", "1", "--out", str(tmp_path)]) == 2
    assert "already holds a study" in capsys.readouterr().err
