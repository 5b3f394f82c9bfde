"""Fuzzing of the text inputs users hand us: YAML recipes and sharded-checkpoint indexes.

Only the project's clear errors may come out, never an unhandled exception.
"""

import json

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_ptq.config import load_yaml
from dist_ptq.errors import CheckpointError, ConfigError
from dist_ptq.model.safetensors_io import ModelFiles, write_safetensors

FIELDS = [
    "version", "mode", "backend", "opname_blacklist", "algo_args", "weight_quant_dtype", "kvcache_quant_dtype",
    "act_quant_dtype", "outliers_suppression", "act_quant_granularity", "kvcache_quant_granularity",
    "precision_recovery", "weight_quant_granularity", "group_size", "weight_clip", "layer_policies",
]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-300, 300), st.floats(allow_nan=True), st.text(max_size=12),
    st.sampled_from(["int8", "int4", "quantize", "deploy", "ascend", "none", "smooth", "per_token", "per_group",
                     "per_channel", "gptq", "awq", "null", "64", "128"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
documents = st.dictionaries(st.sampled_from(FIELDS + ["bogus"]), values, max_size=6)
SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(doc=documents)
def test_yaml_documents_load_or_raise_config_error(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("y") / "cfg.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    try:
        load_yaml(path)
    except ConfigError as e:
        assert "\n" not in str(e) and str(path) in str(e)


@SETTINGS
@given(text=st.text(max_size=200))
def test_arbitrary_yaml_text_loads_or_raises_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("t") / "cfg.yaml"
    path.write_text(text)
    try:
        load_yaml(path)
    except ConfigError as e:
        assert "\n" not in str(e)


index_entries = st.dictionaries(
    st.sampled_from(["a", "b", "c", "x"]),
    st.one_of(st.sampled_from(["s1.safetensors", "s2.safetensors", "../s1.safetensors", "/etc/passwd",
                               "missing.safetensors", "", "."]),
              st.text(max_size=10), st.integers(), st.none()),
    max_size=4,
)
indexes = st.one_of(
    st.builds(lambda wm, meta: {"metadata": meta, "weight_map": wm}, index_entries,
              st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))),
    values,
)


@SETTINGS
@given(index=indexes)
def test_index_files_open_or_raise_checkpoint_error(tmp_path_factory, index):
    d = tmp_path_factory.mktemp("m")
    write_safetensors(d / "s1.safetensors", {"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)})
    write_safetensors(d / "s2.safetensors", {"c": np.zeros(1, np.float32)})
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        files = ModelFiles(d)
        for name in files.keys():
            files.get_float32(name)
        files.close()
    except CheckpointError as e:
        assert "\n" not in str(e)
