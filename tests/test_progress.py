"""What the command line shows while working: progress off a terminal (logs, CI) is plain
periodic lines, never a cut bar; on one, a bar; model loading keeps the libraries quiet."""

from __future__ import annotations

import io

from rich.console import Console

from iosd.progress import PlainLines, RichBar, open_progress, stage_progress
from iosd.train.runlog import Progress

BAR_CHARS = ("━", "╸", "╺", "…")


def log_console() -> tuple[Console, io.StringIO]:
    """A console writing to a file, as under `iosd-train ... 2> log` (narrow: lines must not wrap)."""
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=40), buf


def assert_plain(text: str) -> list[str]:
    assert not any(ch in text for ch in BAR_CHARS), text
    assert "\x1b[" not in text, text
    return text.splitlines()


def test_training_progress_in_a_log_is_plain_lines():
    console, buf = log_console()
    progress = Progress(True, 100, 0, "runs/x", console=console)
    for step in range(1, 101):
        progress.advance(step, loss=f"{1 / step:.4f}", speed="28.4")
    progress.close()
    lines = assert_plain(buf.getvalue())
    assert len(lines) == 10  # every tenth of the run; the last one is also the final
    assert all(line.startswith("train runs/x step ") and " loss " in line and "28.4 samples/s" in line for line in lines)
    assert lines[4].startswith("train runs/x step 50/100 loss 0.0200 28.4 samples/s elapsed 0:00:00 eta ")
    assert lines[-1].startswith("train runs/x step 100/100 loss 0.0100") and lines[-1].endswith("eta 0:00:00")


def test_training_progress_prints_the_final_step_and_messages():
    console, buf = log_console()
    progress = Progress(True, 1000, 400, "runs/x", console=console)  # resumed at step 400
    progress.advance(401)
    progress.print("interrupted: saving a checkpoint after this step")
    progress.advance(402, loss="0.5000", speed="3.0")
    progress.close()
    lines = assert_plain(buf.getvalue())
    assert lines == ["interrupted: saving a checkpoint after this step", lines[1]]
    assert lines[1].startswith("train runs/x step 402/1000 loss 0.5000 3.0 samples/s elapsed ")


def test_the_final_line_has_the_final_validation():
    console, buf = log_console()
    progress = Progress(True, 20, 0, "runs/x", console=console)
    for step in range(1, 21):
        progress.advance(step, loss="0.2000", speed="5.0")
    progress.advance(20, val="val mIoU 0.741")
    progress.close()
    lines = assert_plain(buf.getvalue())
    assert len(lines) == 11 and lines[-2].startswith("train runs/x step 20/20 loss 0.2000 5.0 samples/s elapsed")
    assert lines[-1].startswith("train runs/x step 20/20 loss 0.2000 5.0 samples/s val mIoU 0.741 elapsed")


def test_stage_progress_in_a_log_is_plain_lines():
    console, buf = log_console()
    with stage_progress(True, 25, "shards/x", "gen", console=console) as advance:
        for _ in range(25):
            advance()
    lines = assert_plain(buf.getvalue())
    assert [line.split()[2] for line in lines] == ["3/25", "6/25", "9/25", "12/25", "15/25", "18/25", "21/25", "24/25", "25/25"]
    assert all(line.startswith("gen shards/x ") and " elapsed " in line and " eta " in line for line in lines)


def test_stage_progress_quiet_shows_nothing():
    with stage_progress(False, 10, "shards/x", "gen") as advance:
        assert advance is None


def test_plain_lines_also_every_30_seconds():
    console, buf = log_console()
    now = [0.0]
    lines = PlainLines(console, "gen", "shards/x", 1000, 0, "", {}, {}, clock=lambda: now[0])
    for _ in range(40):  # 40 units, 10 s apart: no tenth of the total reached, three 30 s marks
        now[0] += 10
        lines.update(advance=1)
    out = assert_plain(buf.getvalue())
    assert [line.split()[2] for line in out] == ["3/1000", "6/1000", "9/1000", "12/1000", "15/1000", "18/1000", "21/1000", "24/1000", "27/1000", "30/1000", "33/1000", "36/1000", "39/1000"]
    assert out[0] == "gen shards/x 3/1000 elapsed 0:00:30 eta 2:46:10"


def test_on_a_terminal_a_rich_bar(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    progress = open_progress("train", "runs/x", 10, unit="step", fields={"loss": "loss {}"}, console=console)
    assert isinstance(progress, RichBar)
    progress.update(10, loss="0.1000")
    progress.close()
    assert "━" in buf.getvalue() and "loss 0.1000" in buf.getvalue()


def test_model_loading_silences_the_libraries_unless_verbose(capfd):
    from diffusers.utils import logging as diffusers_logging

    from iosd.pipeline.models import quiet_libraries
    from iosd.verbosity import set_verbose

    before = (diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled())
    with quiet_libraries():
        assert not diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.get_logger("diffusers.models").warning("should be kept in float32")
    assert (diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()) == before
    assert "kept in float32" not in capfd.readouterr().err
    set_verbose(True)
    try:
        with quiet_libraries():
            assert (diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()) == before
    finally:
        set_verbose(False)


def test_every_command_that_loads_a_model_takes_verbose():
    """One --verbose (iosd.verbosity.verbose_option) on each command that loads a diffusion model;
    parsing it sets the flag, and its absence clears it again."""
    from iosd.evaluate.cli import main as eval_main
    from iosd.evaluate.predict_cli import main as predict_main
    from iosd.pipeline.cli import main as gen_main
    from iosd.pipeline.synth_cli import main as synth_main
    from iosd.verbosity import is_verbose

    for command in (gen_main, eval_main, predict_main, synth_main):
        option = next(p for p in command.params if p.name == "verbose")
        ctx = command.make_context(command.name, ["--help"], resilient_parsing=True)
        option.process_value(ctx, True)
        assert is_verbose(), command.name
        option.process_value(ctx, False)
        assert not is_verbose(), command.name
