"""The 4-bit base of QLoRA (Dettmers et al. 2023): NF4 storage with double quantization, a frozen `Linear4bit`
layer that plugs into the core's base-weight protocol, whole-model quantization and memory accounting, and
8-bit blockwise AdamW states.

    from deltatune.quant import quantize_model, footprint
    quantize_model(model, compute_dtype=torch.bfloat16)   # every nn.Linear but the head -> Linear4bit
    print(footprint(model).table())
"""
from .linear4bit import Linear4bit, QuantizedWeightError
from .load import load_quantized
from .model import (
    Footprint, QuantizationError, check_full_precision, check_quantized_training, dequantize_model, footprint,
    is_quantized_model, quantizable_linears, quantize_model, quantized_layers,
)
from .optim8bit import (
    OptimizerMemory, OptimizerUnavailableError, adamw8bit, adamw_state_bytes, bnb_adamw, lora_shapes,
    measured_state_bytes, optimizer_memory,
)
from .nf4 import BLOCKSIZE, BLOCKSIZE2, DYNAMIC_MAP, NF4_CODE, NF4Tensor, dequantize_nf4, dynamic_map, quantize_nf4

__all__ = [
    "NF4_CODE", "DYNAMIC_MAP", "BLOCKSIZE", "BLOCKSIZE2", "NF4Tensor", "quantize_nf4", "dequantize_nf4",
    "dynamic_map", "Linear4bit", "QuantizedWeightError", "QuantizationError", "Footprint", "footprint",
    "quantize_model", "quantizable_linears", "quantized_layers", "is_quantized_model", "dequantize_model",
    "check_full_precision", "check_quantized_training", "load_quantized", "adamw8bit", "bnb_adamw",
    "adamw_state_bytes", "measured_state_bytes", "optimizer_memory", "lora_shapes", "OptimizerMemory",
    "OptimizerUnavailableError",
]
