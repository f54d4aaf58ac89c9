import pytest

from neuroar.config import Config, load_config, save_config
from neuroar.errors import ConfigError


def test_shipped_configs_have_the_documented_shapes():
    demo, reference, paper = load_config("configs/demo.yaml"), load_config("reference"), load_config("paper")
    assert (demo.data.spacing, demo.data.shape, demo.tokenizer.downsample) == (4.0, (40, 48, 44), 2)
    assert (reference.data.spacing, reference.data.shape, reference.tokenizer.downsample) == (2.0, (80, 96, 88), 8)
    assert (paper.data.spacing, paper.data.shape, paper.tokenizer.downsample) == (1.0, (160, 192, 176), 16)
    assert reference.latent_shape == paper.latent_shape == (10, 12, 11) and demo.latent_shape == (20, 24, 22)
    assert demo.tokenizer.code == "change" and reference.tokenizer.code == paper.tokenizer.code == "scan"
    assert demo.autoencoder_latent_shape == (10, 12, 11) and reference.autoencoder_latent_shape == (20, 24, 22)
    assert len(paper.tokenizer.scales) == 5 and paper.tokenizer.scales[-1] == (10, 12, 11)
    assert paper.tokenizer.codebook_size == 2048 and paper.transformer.depth == 32


def test_overrides_are_parsed_and_typed():
    config = load_config("demo", ["data.spacing=1", "seed=7", "tokenizer.scales=[[1,1,1],[5,6,6],[20,24,22]]",
                                  "data.cache_dir=/tmp/x"])
    assert config.data.spacing == 1.0 and isinstance(config.data.spacing, float)
    assert config.seed == 7
    assert config.tokenizer.scales == ((1, 1, 1), (5, 6, 6), (20, 24, 22))
    assert config.data.cache_dir == "/tmp/x"


@pytest.mark.parametrize("override, key", [
    ("data.shap=[80,96,88]", "data.shap"),
    ("data.spacing=abc", "data.spacing"),
    ("seed=1.5", "seed"),
    ("data.register=1", "data.register"),
    ("data.shape=[80,96]", "data.shape"),
    ("data.shape=[80,96,87]", "data.shape"),
    ("data.spacing=-2", "data.spacing"),
    ("data.spacing=.nan", "data.spacing"),
    ("data.split_fractions=[0.5,0.2,0.2]", "data.split_fractions"),
    ("tokenizer.downsample=6", "tokenizer.downsample"),
    ("tokenizer.scales=[[1,1,1],[5,5,5]]", "tokenizer.scales"),
    ("tokenizer.scales=[[3,4,3],[1,1,1],[20,24,22]]", "tokenizer.scales[1]"),
    ("tokenizer.scales=[[1,1,1],[21,24,22],[20,24,22]]", "tokenizer.scales[1]"),
    ("tokenizer=3", "tokenizer"),
    ("baselines=[ldm,diffusion]", "baselines"),
    ("baselines=[ldm,ldm]", "baselines"),
    ("nokey", "key.sub=value"),
])
def test_invalid_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config("demo", [override])


def test_unknown_key_in_a_file_names_file_key_and_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  spacng: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown key 'data.spacng'.*Did you mean 'data.spacing'"):
        load_config(path)


@pytest.mark.parametrize("text", ["data: [1, 2", "- 1\n- 2\n", "name: 5"])
def test_malformed_files_raise_config_errors(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)


def test_missing_file_lists_shipped_configs():
    with pytest.raises(ConfigError, match="does not exist.*demo, paper"):
        load_config("nope.yaml")


def test_saved_config_loads_back_identical(tmp_path):
    config = load_config("paper", ["seed=3"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert load_config(None) == Config()
