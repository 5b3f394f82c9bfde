"""Blacklist entries and layer-policy patterns that match no layer of a model.

A config is validated without the model, so a typo in ``opname_blacklist`` (``"lm-head"``) or in a
``layer_policies`` regex silently quantizes layers the user meant to keep or treat differently.
These functions need the model's layer names; the caller that has them (the runner) warns.
"""

from __future__ import annotations

import re
import warnings

from dist_ptq.config.ptq_config import PTQConfig


def unmatched_patterns(cfg: PTQConfig, names: list[str]) -> list[str]:
    """The entries of ``cfg`` that apply to none of ``names``, in config order.

    Matching is as :meth:`PTQConfig.config_for` does it: a blacklist entry matches a name it is a
    substring of, a policy pattern one it ``re.search``-es. Checked: the top-level blacklist against
    every name, each policy pattern against every name, and each policy's own blacklist (entries it
    does not share with the top level, as YAML policies inherit it) against the names its pattern
    matches (elsewhere it never applies). An entry may be listed once per place.
    """
    out = [entry for entry in cfg.opname_blacklist if not any(entry in name for name in names)]
    for pattern, policy in cfg.layer_policies.items():
        covered = [name for name in names if re.search(pattern, name)]
        if not covered:
            out.append(pattern)
        # a policy read from YAML inherits the top-level blacklist, which was checked above
        own = [e for e in policy.opname_blacklist if e not in cfg.opname_blacklist]
        out.extend(entry for entry in own if not any(entry in name for name in covered))
    return out


def warn_unmatched(cfg: PTQConfig, names: list[str]) -> list[str]:
    """Emit one one-line ``UserWarning`` listing :func:`unmatched_patterns`, if any; returns them."""
    unmatched = unmatched_patterns(cfg, names)
    if unmatched:
        warnings.warn(f"opname_blacklist / layer_policies entries match no layer of the model "
                      f"({len(names)} layers): {', '.join(repr(p) for p in unmatched)}", stacklevel=2)
    return unmatched
