"""The edgerlhf loggers and progress bars (run.log_level)."""
import logging

from edgerlhf.core.logs import configure_logging, progress


def test_progress_bars_show_at_info_and_not_for_short_loops():
    try:
        configure_logging("INFO")
        assert not progress(range(10)).disable
        assert progress(range(3), min_total=8).disable  # scoring one small batch stays quiet
        configure_logging("WARNING")
        assert progress(range(10)).disable
        assert logging.getLogger("edgerlhf.core.ppo_loop").getEffectiveLevel() == logging.WARNING
    finally:
        configure_logging("INFO")


def test_a_bad_log_level_is_refused_by_the_config():
    import pytest

    from edgerlhf.core.config import load_config

    with pytest.raises(ValueError, match="run.log_level='LOUD'"):
        load_config("tiny", overrides={"run.log_level": "LOUD"})
