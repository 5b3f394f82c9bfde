"""Deprecated location kept while tests move over: the engine is the coordinator."""

from dist_ptq.runtime.coordinator import calibrate, quantize, resolve_schedule  # noqa: F401
