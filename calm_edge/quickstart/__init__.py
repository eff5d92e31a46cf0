"""`calm-edge quickstart`: the whole pipeline in one command, resumable stage by stage.

    pipeline.py  the quickstart's settings and stages, and `run_quickstart`
    stages.py    the resumable stage runner (a finished stage is skipped on the next run)
    report.py    the summary: summary.json, summary.png and the printed table

    from calm_edge.quickstart import run_quickstart, format_table
    print(format_table(run_quickstart("quickstart", preset_name="tiny")))
"""
from calm_edge.quickstart.pipeline import DEFAULT_DATA, QUICKSTART_PRESETS, QuickstartSettings, run_quickstart
from calm_edge.quickstart.report import format_table

__all__ = ["DEFAULT_DATA", "QUICKSTART_PRESETS", "QuickstartSettings", "format_table", "run_quickstart"]
