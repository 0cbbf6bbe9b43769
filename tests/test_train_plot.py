"""`python -m train plot`: one curve per run, labelled by quant mode; clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train.plot import load_curves, main, moving_average, plot_runs, quant_label, unique_labels

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(folder: Path, quant: dict, losses: list[float], eval_every: int = 2) -> Path:
    """A run folder shaped like the trainer's: config.json + metrics.jsonl."""
    folder.mkdir(parents=True)
    config = {"format_version": 1, "model": {"compute_dtype": "float32"}, "quant": quant,
              "train": {}}
    (folder / "config.json").write_text(json.dumps(config))
    with open(folder / "metrics.jsonl", "w") as f:
        for step, loss in enumerate(losses, start=1):
            record = {"step": step, "loss": loss, "lr": 1e-3}
            if step % eval_every == 0:
                record["eval_loss"] = loss + 0.1
            f.write(json.dumps(record) + "\n")
        f.write('{"step": 9, "lo')  # a line cut short by a kill is skipped
    return folder


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [make_run(tmp_path / "a", {"mode": "none"}, [5.0, 4.0, 3.5, 3.0]),
            make_run(tmp_path / "b", {"mode": "int8"}, [5.1, 4.1, 3.6, 3.1]),
            make_run(tmp_path / "c", {"mode": "fp8", "scaling": "current"}, [5.2, 4.3, 3.7, 3.2])]


def test_labels_name_the_quant_mode():
    assert quant_label({"mode": "none"}) == "float"
    assert quant_label({"mode": "fp8", "scaling": "delayed"}) == "fp8 (delayed)"
    assert quant_label({"mode": "int4w", "group_size": 32}) == "int4w g32"


def test_curves_read_from_metrics(runs):
    curves = load_curves(runs[1])
    assert curves.label == "int8"
    assert curves.steps == [1, 2, 3, 4]
    assert curves.eval_steps == [2, 4]
    assert curves.eval_losses == pytest.approx([4.2, 3.2])


def test_moving_average_against_hand_computed_means():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([1.0, 3.0], 1) == [1.0, 3.0]


def test_plot_draws_one_curve_per_run_per_panel(runs, tmp_path, monkeypatch):
    import matplotlib.figure

    drawn: list[list[int]] = []
    save = matplotlib.figure.Figure.savefig

    def counting_savefig(fig, *args, **kwargs):
        drawn.append([len(ax.get_lines()) for ax in fig.axes])
        labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        drawn.append(labels)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", counting_savefig)
    out = tmp_path / "curves.png"
    assert plot_runs(runs, out) == 3
    assert drawn == [[3, 3], ["float", "int8", "fp8 (current)"]]
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_cli_via_python_m_train(runs, tmp_path):
    out = tmp_path / "fig.png"
    result = subprocess.run([sys.executable, "-m", "train", "plot", *map(str, runs),
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "3 runs" in result.stderr
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_same_mode_twice_gets_the_folder_name(tmp_path):
    a = make_run(tmp_path / "seed0", {"mode": "int8"}, [2.0, 1.0])
    b = make_run(tmp_path / "seed1", {"mode": "int8"}, [2.0, 1.5])
    assert unique_labels([load_curves(a), load_curves(b)], [a, b]) == ["int8 (seed0)",
                                                                        "int8 (seed1)"]
    assert plot_runs([a, b], tmp_path / "x.png") == 2


def test_runs_without_evaluations_still_plot(tmp_path):
    run = make_run(tmp_path / "r", {"mode": "none"}, [2.0, 1.0], eval_every=100)
    assert plot_runs([run], tmp_path / "x.png") == 1


def test_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_says_how_to_install(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    assert main([str(runs[0]), "--out", str(tmp_path / "x.png")]) == 2
    assert "pip install -e .[plot]" in capsys.readouterr().err


def test_train_help_mentions_plot():
    result = subprocess.run([sys.executable, "-m", "train", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    assert "python -m train plot RUN" in result.stdout


def plot_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


def test_out_never_writes_over_anything(runs, tmp_path, capsys):
    """An existing file (ours or not), a run's own files, a run folder: all refused as is."""
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    for out in (notes, runs[0] / "metrics.jsonl", runs[0] / "config.json", runs[1]):
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        err = plot_error([str(r) for r in runs] + ["--out", str(out)], capsys)
        assert str(out) in err
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.rglob(".*.png"))  # no temporary image left behind


@pytest.mark.parametrize("line, field", [('{"step": 1, "loss": "abc"}', "loss"),
                                         ('{"step": 1, "loss": [1]}', "loss"),
                                         ('{"step": "one", "loss": 1.0}', "step"),
                                         ('{"step": 1, "loss": 1.0, "eval_loss": {}}',
                                          "eval_loss")])
def test_metrics_of_the_wrong_type_name_file_line_and_field(tmp_path, capsys, line, field):
    run = make_run(tmp_path / "r", {"mode": "none"}, [5.0, 4.0])
    with open(run / "metrics.jsonl", "a") as f:
        f.write("\n" + line + "\n")
    err = plot_error([str(run), "--out", str(tmp_path / "x.png")], capsys)
    assert f"metrics.jsonl:4: {field!r}" in err, err


@pytest.mark.parametrize("section", ["quant", "model"])
def test_config_sections_of_the_wrong_type(tmp_path, capsys, section):
    run = make_run(tmp_path / "r", {"mode": "none"}, [5.0, 4.0])
    config = json.loads((run / "config.json").read_text())
    config[section] = ["int8"]
    (run / "config.json").write_text(json.dumps(config))
    err = plot_error([str(run), "--out", str(tmp_path / "x.png")], capsys)
    assert "config.json" in err and repr(section) in err, err
