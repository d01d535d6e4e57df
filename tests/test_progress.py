"""The CLI's tqdm progress callback and the offset helper that lets several calls share one bar."""

from qwen_identity.core.runtime.progress import offset_progress, tqdm_progress


def test_tqdm_progress_tracks_done_and_total(capsys):
    with tqdm_progress("extract", disable=False) as bar:
        bar(0, 4)
        bar(3, 4)
        assert bar._bar.n == 3 and bar._bar.total == 4
        bar(5, 6)
        assert bar._bar.total == 6
    assert bar._bar is None
    assert "extract" in capsys.readouterr().err


def test_offset_progress_shares_one_bar():
    seen = []
    first = offset_progress(lambda d, t: seen.append((d, t)), 0, 5)
    second = offset_progress(lambda d, t: seen.append((d, t)), 2, 5)
    first(2, 2)
    second(3, 3)
    assert seen == [(2, 5), (5, 5)]
    assert offset_progress(None, 1, 2) is None
