from .flops import flops_per_token, num_matmul_params, num_params
from .llama import IGNORE_INDEX, Llama, hf_state_dict_key
from .presets import PRESETS, ModelConfig, get_model_config

__all__ = ["IGNORE_INDEX", "PRESETS", "Llama", "ModelConfig", "flops_per_token", "get_model_config",
           "hf_state_dict_key", "num_matmul_params", "num_params"]
