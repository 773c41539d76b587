"""deltatune: parameter-efficient fine-tuning for PyTorch.

    import deltatune as dt
    model = dt.attach(base, dt.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    dt.save_adapter(model, "out/adapter")               # peft's format
    model = dt.load_adapter(base, "out/adapter", name="other")
    dt.merge(model); dt.unmerge(model); merged = dt.merge_and_unload(model)
"""
from ._version import __version__
from .core.config import AdapterConfig, ConfigError
from .core.io import AdapterFileError, adapter_tensors, load_adapter, read_adapter, save_adapter, set_adapter_tensors
from .core.lowrank import LowRankFactors, low_rank_factors, save_as_lora
from .core.delta import Delta, NotMergeableError
from .core.sites import BlockSite, Site, WeightSite
from .core.model import (
    active_adapters,
    adapter_configs,
    adapters,
    attach,
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    route,
    set_active,
    trainable_parameters,
    unload,
    unmerge,
)
from .core.registry import register, register_variant, registered_methods
from .core.adapter import update_config
from .methods.adalora import AdaLoraConfig
from .methods.relora import ReLoraConfig
from .core.targets import TargetNotFoundError
from .methods.lora import LoraConfig
from .methods.lora_init import replace_lora_weights_loftq
from .methods.prompt_tuning import PromptTuningConfig
from .methods.p_tuning import PromptEncoderConfig
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.fishmask import FishMaskConfig
from .methods.child_tuning import ChildTuningConfig, ChildTuningDConfig
from .methods.adapter_fusion import AdapterFusionConfig
from .methods.ia3 import IA3Config
from .methods.bottleneck import BottleneckConfig, ParallelAdapterConfig, PfeifferConfig
from .methods.bitfit import BitFitConfig
from .methods.full import FullConfig
from .compose import combine_adapters
from .compose.lorahub import lorahub
from .methods.dylora import DyLoraConfig
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.vera import VeraConfig

AdapterLayer = Site  # the name of the host layer before the sites redesign
from .train.config import TrainConfig, load_config
from .train.loop import TrainResult  # `train`: the package deltatune.train, callable as train.loop.train

__all__ = [
    "replace_lora_weights_loftq",
    "__version__", "AdapterConfig", "ConfigError", "AdapterFileError", "Site", "WeightSite", "BlockSite", "AdapterLayer",
    "Delta", "NotMergeableError", "adapters", "register_variant", "TargetNotFoundError",
    "LoraConfig", "IA3Config", "PromptTuningConfig", "BottleneckConfig", "BitFitConfig", "FullConfig",
    "PfeifferConfig", "ParallelAdapterConfig", "PromptEncoderConfig", "PrefixTuningConfig",
    "FishMaskConfig", "ChildTuningConfig", "ChildTuningDConfig", "AdapterFusionConfig",
    "attach", "load_adapter", "save_adapter", "read_adapter", "adapter_tensors", "active_adapters",
    "adapter_configs", "set_active", "delete_adapter", "disable_adapters", "route", "merge", "unmerge",
    "unload", "merge_and_unload", "trainable_parameters", "print_trainable_parameters", "register", "registered_methods",
    "TrainConfig", "TrainResult", "load_config", "train", "update_config", "AdaLoraConfig", "ReLoraConfig",
    "set_adapter_tensors", "save_as_lora", "LowRankFactors", "low_rank_factors", "DyLoraConfig",
    "LoHaConfig", "LoKrConfig", "VeraConfig", "combine_adapters", "lorahub",
]
