"""The schedules a run can follow (the coordinator's docstring draws them).

The values are what ``dist_ptq.json`` and ``report.json`` record, and what ``--schedule`` takes.
This module imports nothing, so the CLI can offer the choices without loading MindSpore.
"""

from __future__ import annotations

from enum import StrEnum


class Schedule(StrEnum):
    AUTO = "auto"  # asked for: sequential when GPTQ/AWQ is on, else pipeline (SPEC §6)
    PIPELINE = "pipeline"
    SEQUENTIAL = "sequential"
    DATA_FREE = "data-free"  # never asked for: what a recipe without calibration runs


CHOICES = (Schedule.AUTO, Schedule.PIPELINE, Schedule.SEQUENTIAL)  # what a user may ask for
