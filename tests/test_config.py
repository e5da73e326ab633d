"""The typed config: one override path, validation errors that name the key, presets that load."""

import re
from pathlib import Path

import pytest
import yaml

from app.config import Config, ConfigError, apply_overrides, flatten_keys, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_load_without_a_file():
    config = load_config()
    assert config == Config()
    assert config.train.lr == 5e-5 and config.scaling.num_workers == 2


def test_overrides_from_command_line_and_mapping_agree():
    from_cli = load_config(None, ["train.lr=1e-4", "scaling.use_gpu=true", "data.max_rows=100", "run.name=x"])
    from_map = load_config(None, {"train.lr": 1e-4, "scaling.use_gpu": True, "data.max_rows": 100, "run.name": "x"})
    assert from_cli == from_map
    assert from_cli.train.lr == 1e-4 and from_cli.scaling.use_gpu is True


def test_override_values_are_read_as_yaml():
    assert parse_override("data.train_path=null") == ("data.train_path", None)
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override("run.name=a=b") == ("run.name", "a=b")


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'; did you mean 'train\.lr'"):
        load_config(None, ["train.lrr=1"])


def test_bad_value_names_the_dotted_key():
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_config(None, ["train.precision=fp8"])


def test_unknown_key_in_a_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epocs: unknown key; did you mean 'train\.epochs'"):
        load_config(path)


def test_cross_field_rule():
    with pytest.raises(ConfigError, match="valid_fold"):
        load_config(None, ["data.n_folds=3", "data.valid_fold=3"])


def test_override_that_is_not_key_value():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])


def test_apply_overrides_does_not_mutate_its_input():
    raw = {"train": {"lr": 1.0}}
    apply_overrides(raw, {"train.lr": 2.0})
    assert raw == {"train": {"lr": 1.0}}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_preset_validates_and_holds_only_differences(path):
    load_config(path)
    raw = yaml.safe_load(path.read_text()) or {}
    defaults = flatten_keys(Config().model_dump(mode="json"))
    same = {key: value for key, value in flatten_keys(raw).items() if defaults.get(key) == value}
    assert not same, f"{path.name} repeats defaults: {same}"


def test_there_are_presets():
    assert {"demo.yaml", "tiny.yaml"} <= {p.name for p in CONFIGS}


GPU_PRESETS = {"gemma2-9b-qlora-zero2.yaml", "llama3-8b-lora.yaml", "llama3-8b-full-zero3.yaml",
               "deberta-v3-large.yaml", "flan-t5-large.yaml", "qwen2.5-0.5b-lora.yaml"}
TINY_PRESETS = {"tiny-llama-lora.yaml", "tiny-gemma2-qlora.yaml", "tiny-qwen2-decoder-lm.yaml", "tiny-t5.yaml",
                "tiny-llama-zero3.yaml", "tiny-qwen2-instruct.yaml"}
# The header line every GPU preset carries, e.g.
# "# Hardware: 8x NVIDIA A100 40GB, one AWS p4d.24xlarge (cluster.yaml node type gpu-8x-a100)."
HARDWARE_LINE = re.compile(r"^# Hardware: (?P<count>\d+)x NVIDIA (?P<gpu>\S+) (?P<memory_gb>\d+)GB, .*"
                           r"node type (?P<node_type>[\w.-]+)\)", re.MULTILINE)


def test_the_gpu_and_tiny_presets_exist():
    assert GPU_PRESETS | TINY_PRESETS <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_a_gpu_preset_names_its_hardware_and_asks_for_it(path):
    config = load_config(path)
    hardware = HARDWARE_LINE.search(path.read_text())
    if path.name not in GPU_PRESETS and not config.scaling.use_gpu:
        assert hardware is None, f"{path.name} names GPU hardware but trains on the CPU"
        return
    assert path.name in GPU_PRESETS, f"{path.name} uses GPUs: add it to GPU_PRESETS"
    assert hardware, f"{path.name} needs a '# Hardware: <n>x NVIDIA <gpu> <memory>GB, ... node type <type>)' line"
    assert config.scaling.use_gpu, f"{path.name} names {hardware['gpu']} GPUs but leaves scaling.use_gpu false"
    assert config.scaling.num_workers * config.scaling.gpus_per_worker <= int(hardware["count"])
    marketed = float(hardware["memory_gb"])  # nvidia-smi reports less; tests/test_cluster_yaml.py checks it exactly
    assert 0.9 * marketed <= config.scaling.accelerator_memory_gb <= marketed, (
        f"{path.name}: scaling.accelerator_memory_gb should be what nvidia-smi reports for one {hardware['gpu']}")
    assert config.train.precision in ("bf16", "fp16"), f"{path.name}: name the GPU's mixed precision"


@pytest.mark.parametrize("name", sorted(TINY_PRESETS))
def test_tiny_presets_are_small_offline_cpu_runs(name):
    config = load_config(Path(CONFIGS[0].parent, name))
    assert config.model.name_or_path in {"random:llama-tiny", "random:gemma2-tiny", "random:qwen2-tiny",
                                         "random:t5-tiny"}, "tests build tiny models offline (app/tiny.py)"
    assert config.data.train_path is None and config.data.builtin_rows <= 500
    assert not config.scaling.use_gpu and config.train.max_steps is not None and config.train.max_steps <= 20
    assert config.format.max_length <= 128
