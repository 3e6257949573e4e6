"""The run's time-and-memory figure: what it draws from a metric history."""

from __future__ import annotations

import numpy as np
import pandas as pd

from flows import plots


def test_resources_stacks_the_stages_and_marks_the_releases():
    history = pd.DataFrame({
        "iteration": [0, 1, 2, 3],
        "seconds_collect_pre": [2.0, 2.5, 2.0, 2.2],
        "seconds_meta_update": [1.0, 1.0, 1.5, 1.0],
        "seconds_evaluate": [np.nan, 0.3, np.nan, np.nan],  # only where it ran
        "seconds_iteration": [3.1, 3.9, 3.6, 3.3],
        "memory_resident_mb": [1024.0, 2048.0, 1536.0, 1800.0],
        "memory_released_mb": [0.0, 0.0, 600.0, 0.0],
    })
    fig = plots.resources(history, "t")
    top, bottom = fig.axes
    stacked = top.collections
    assert [c.get_label() for c in stacked] == ["collect pre", "meta update", "evaluate"]
    # the stack's upper edge is the stages' sum, a missing stage counting 0
    upper = stacked[-1].get_paths()[0].vertices[:, 1].max()
    assert upper == 2.5 + 1.0 + 0.3
    lines = {line.get_label(): line for line in top.get_lines() + bottom.get_lines()}
    assert list(lines["whole iteration"].get_ydata()) == [3.1, 3.9, 3.6, 3.3]
    assert list(lines["resident memory after the meta-update"].get_ydata()) == [
        1.0, 2.0, 1.5, 1800 / 1024]
    marks = lines["release ran (malloc_trim)"]
    assert list(marks.get_xdata()) == [2] and list(marks.get_ydata()) == [1.5]


def test_resources_marks_a_release_that_freed_nothing():
    # memory_trimmed tells a trim that handed back 0 bytes from no trim at all
    history = pd.DataFrame({"iteration": [0, 1, 2], "memory_resident_mb": [900.0, 1500.0, 950.0],
                            "memory_released_mb": [0.0, 0.0, 550.0],
                            "memory_trimmed": [0.0, 1.0, 1.0]})
    marks = {line.get_label(): line for line in plots.resources(history, "t").axes[1].get_lines()}
    assert list(marks["release ran (malloc_trim)"].get_xdata()) == [1, 2]


def test_resources_draws_the_peaks_where_recorded():
    history = pd.DataFrame({"iteration": [0, 1, 2], "memory_resident_mb": [900.0, 1500.0, 950.0],
                            "memory_peak_mb": [2048.0, 2560.0, 2048.0],
                            "memory_peak_evaluate_mb": [np.nan, 3072.0, np.nan]})
    lines = {line.get_label(): line
             for line in plots.resources(history, "t").axes[1].get_lines()}
    assert list(lines["peak during the meta-iteration"].get_ydata()) == [2.0, 2.5, 2.0]
    evaluated = lines["peak during a held-out evaluation"]
    assert list(evaluated.get_xdata()) == [1] and list(evaluated.get_ydata()) == [3.0]


def test_resources_without_figures():
    assert plots.resources(pd.DataFrame({"iteration": [0], "post_return": [1.0]}), "t") is None
    fig = plots.resources(pd.DataFrame({"iteration": [0, 1],
                                        "seconds_iteration": [1.0, 2.0]}), "t")
    assert fig.axes[1].texts[0].get_text() == "no memory figures recorded"


def test_resources_marks_no_release_where_none_ran():
    fig = plots.resources(pd.DataFrame({"iteration": [0, 1], "memory_resident_mb": [900.0, 950.0],
                                        "memory_released_mb": [0.0, 0.0]}), "t")
    assert [line.get_label() for line in fig.axes[1].get_lines()] == [
        "resident memory after the meta-update"]
