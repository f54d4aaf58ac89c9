"""Progress bars on a terminal, one line per stage in a log file."""

from neuroar.progress import Progress


def test_progress_in_a_log_file_is_one_line_per_stage(capsys):
    bar = Progress(range(500), desc="tokenizer", unit="step")
    for step in bar:
        bar.set_postfix({"l1": f"{1 / (step + 1):.4f}"})
    with Progress(total=3, desc="synth", unit="subject") as counted:
        counted.update(3)
    for _ in Progress(range(5), desc="hidden", unit="step", enabled=False):
        pass
    err = capsys.readouterr().err  # stderr is not a terminal here, as in a log file
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("tokenizer: 500 steps in ") and lines[0].endswith("(l1 0.0020)")
    assert lines[1].startswith("synth: 3 subjects in ")
