"""Random and mutated inputs to the loaders give a clear error or a valid result, never a crash."""

import contextlib
import warnings

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuroar.config import Config, load_config
from neuroar.data.manifest import read_manifest
from neuroar.errors import ConfigError, ManifestError

DEMO = load_config("demo").to_dict()
# Repeatable in CI; tmp_path is only a folder to write into, so sharing it between examples is fine.
FUZZ = {"deadline": None, "derandomize": True, "suppress_health_check": [HealthCheck.function_scoped_fixture]}
TEXT = st.characters(blacklist_categories=("Cs",))  # lone surrogates cannot be written to a file at all
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(TEXT, max_size=8), st.lists(st.integers(-5, 200), max_size=4),
                   st.lists(st.lists(st.integers(-2, 13), max_size=4), max_size=6))


@st.composite
def mutated_configs(draw):
    config = yaml.safe_load(yaml.safe_dump(DEMO))
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from([*config, "extra"]))
        if isinstance(config.get(section), dict) and draw(st.booleans()):
            key = draw(st.sampled_from([*config[section], "bogus"]))
            config[section][key] = draw(VALUES)
        else:
            config[section] = draw(VALUES)
    return config


@settings(max_examples=150, **FUZZ)
@given(config=mutated_configs())
def test_mutated_configs_load_or_raise_config_error(tmp_path, config):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        assert isinstance(load_config(path), Config)
    except ConfigError as err:
        assert str(err).startswith(str(path))


@settings(max_examples=100, **FUZZ)
@given(text=st.text(TEXT, max_size=300))
def test_random_text_as_config_or_override(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    for attempt in (lambda: load_config(path), lambda: load_config("demo", [text])):
        with contextlib.suppress(ConfigError):
            attempt()


CELLS = st.one_of(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"), max_size=10),
                  st.sampled_from(["", "70", "nan", "-1", "200", "a", "img.nii.gz", "train", "test"]))


@settings(max_examples=150, **FUZZ)
@given(header=st.lists(st.sampled_from(["subject_id", "session_id", "age", "path", "split", "sex", "x", ""]),
                       min_size=1, max_size=6),
       rows=st.lists(st.lists(CELLS, min_size=1, max_size=6), max_size=5))
def test_random_manifests_load_or_raise_manifest_error(tmp_path, header, rows):
    path = tmp_path / "m.csv"
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(ManifestError):
            read_manifest(path)


@settings(max_examples=50, **FUZZ)
@given(data=st.binary(max_size=200))
def test_binary_garbage_manifest(tmp_path, data):
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    with contextlib.suppress(ManifestError):
        read_manifest(path)
