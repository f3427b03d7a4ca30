"""Bad configuration stops before any work, with one line naming the key."""

import math

import pytest

from popri_flwr.config import ConfigError
from popri_flwr.hydra_config import config_from_run_config, load_config


def test_defaults_and_demo_compose():
    cfg = load_config(["experiment=demo"])
    assert cfg.strategy.name == "popri" and cfg.strategy.samples_per_prompt == 6
    assert cfg.data.source == "sotu" and cfg.privacy.epsilon == 1.0
    assert cfg.privacy.delta == pytest.approx(1e-5)


@pytest.mark.parametrize(
    "override, key",
    [
        ("privacy.sample_rate=1.5", "privacy.sample_rate"),
        ("privacy.sample_rate=0", "privacy.sample_rate"),
        ("privacy.epsilon=-1", "privacy.epsilon"),
        ("privacy.delta=2", "privacy.delta"),
        ("strategy.reject_rank=10", "strategy.reject_rank"),
        ("strategy.payload=weights", "strategy.payload"),
        ("strategy.name=nope", "strategy.name"),
        ("generation.backend=tgi", "generation.backend"),
        ("data.source=s3", "data.source"),
        ("data.eval_fraction=1.5", "data.eval_fraction"),
        ("rounds=zero", "rounds"),
        ("+privacy.epsilom=1", "privacy.epsilom"),
        ("dpo.beta=-0.1", "dpo.beta"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    assert str(info.value).startswith(key), str(info.value)
    assert "\n" not in str(info.value)


def test_epsilon_inf_only_when_asked():
    assert math.isinf(load_config(["privacy.epsilon=inf"]).privacy.epsilon)


def test_flower_run_config_maps_onto_overrides(tmp_path):
    cfg = config_from_run_config(
        {
            "experiment": "demo",
            "overrides": "privacy.epsilon=7 strategy.num_prompts=5",
            "num-server-rounds": 2,
            "output-dir": str(tmp_path),
        }
    )
    assert (cfg.rounds, cfg.privacy.epsilon, cfg.strategy.num_prompts) == (2, 7.0, 5)
    assert cfg.run_dir == str(tmp_path)
