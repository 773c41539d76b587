"""NF4 storage with double quantization, bit for bit as QLoRA (Dettmers et al. 2023, 2305.14314 §3) and
bitsandbytes define it.

    w (any shape) ──flatten──► blocks of 64 ──► c_b = max|w| per block ──► q = nearest NF4 code of w / c_b
                                                       │
                 double quantization (DQ, §3):         ▼
                 c_b − mean(c) ──► blocks of 256 ──► 8-bit "dynamic" codes q8 + one fp32 absmax2 per 256-block

    dequantize:  w ≈ NF4[q] · c_b,   c_b = DYN8[q8_b] · absmax2[b // 256] + mean(c)   (with DQ)

Storage per weight: 4 bits + 32/64 (fp32 c_b) = 4.5 bits; with DQ 4 + 8/64 + 32/(64·256) ≈ 4.127 bits.

Conventions shared with bitsandbytes (`quantize_4bit(quant_type="nf4")`, tested against it):
- the tensor is flattened row-major; the last block may be shorter than 64 (its own absmax);
- a value is scaled by the reciprocal of its block's absmax, clamped to [-1, 1] and bucketized against the
  midpoints of adjacent codes (a value on a midpoint takes the lower code);
- two codes per byte, element 2i in the HIGH nibble: byte = q[2i] << 4 | q[2i+1] (an odd count pads the
  code of 0.0);
- DQ uses bnb's signed dynamic 8-bit map (`create_dynamic_map()`), mean-subtracted, blocks of 256.
  bnb 0.50's *CPU* kernel rounds the 8-bit codes through a 65536-bin lookup table, an approximation of
  nearest rounding; we round to the nearest code exactly (as bnb's pure-PyTorch and CUDA kernels do). The
  two differ by one code for a constant within half a table bin (1/65535 of absmax2) of a midpoint between
  codes: about 0.2% of the 8-bit codes of a real weight (see tests/test_quant.py). A block whose absmax
  equals the mean (e.g. a one-block tensor) gets the code of 0.0 here and code 0 from bnb's CPU kernel
  (both decode to 0, since absmax2 is 0 then).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

# The 16 NF4 values, index = 4-bit code. bnb's create_normal_map(offset=0.9677083, use_extra_value=True):
# 8 positive quantiles norm.ppf(linspace(offset, 0.5, 9)[:-1]), 7 negative ones, an exact 0, divided by the max.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)

NF4_ZERO = 7  # the code of 0.0
BLOCKSIZE = 64  # QLoRA / bnb default; the NF4 absmax block
BLOCKSIZE2 = 256  # the DQ block of absmax constants

# byte -> (value of high nibble, value of low nibble): one gather decodes two weights. Stored as one int64
# per byte (the two fp32 bit patterns side by side): `index_select` on a 1-D table of 8-byte elements is ~3x
# faster on CPU than gathering rows of two floats, and viewing the result as fp32 gives the same values.
_NF4_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # (256, 2)
_NF4_PAIR_BITS = _NF4_PAIRS.contiguous().view(torch.int64).view(256)  # (256,) int64
_CHUNK = 1 << 16  # packed bytes per dequantization pass on CPU: 256 KiB of int32 codes + 512 KiB of fp32 values


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """bitsandbytes' dynamic 8-bit map (Dettmers 2015, 1511.04561), the same 256 float32 values as
    `bnb.functional.create_dynamic_map`: per exponent e = 0..6, 2^e (signed) fraction midpoints in
    [0.1, 1] scaled by 10^(e-6), their negatives, then 0 and 1.0, sorted."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed \
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_MAP = dynamic_map()


@dataclass(frozen=True)
class NF4Tensor:
    """A tensor stored in NF4. All tensors are on one device.

    packed: uint8 (ceil(n/2),), two 4-bit codes per byte, even element in the high nibble.
    absmax: per 64-block scale; float32 (n_blocks,), or uint8 dynamic-map codes with double quantization.
    absmax2: float32 (ceil(n_blocks/256),), the scale of each 256-block of codes in `absmax` (DQ only).
    offset: float32 scalar tensor, mean of the fp32 absmax vector subtracted before DQ (DQ only).
    shape, dtype: of the original tensor (dtype is what `dequantize` returns by default).
    """

    packed: Tensor
    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = BLOCKSIZE
    absmax2: Tensor | None = None
    offset: Tensor | None = None
    blocksize2: int = BLOCKSIZE2

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes and constants)."""
        tensors = [self.packed, self.absmax, self.absmax2, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    def to(self, device: torch.device | str) -> "NF4Tensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, packed=move(self.packed), absmax=move(self.absmax), absmax2=move(self.absmax2),
                       offset=move(self.offset))


def quantize_blockwise(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Absmax blockwise quantization of flattened `x` to the nearest value of a sorted `code` (≤ 256 values).

    Returns (codes uint8 (n,), absmax float32 (ceil(n/blocksize),)). A block of zeros has absmax 0 and codes
    of 0.0 (bnb stores the same; the scale uses max(absmax, 1e-38) only to avoid 0/0).
    """
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)  # (n_blocks, blocksize)
    code = code.to(flat.device)
    midpoints = (code[:-1] + code[1:]) / 2
    codes = torch.bucketize(scaled.view(-1)[:n], midpoints, out_int32=True).to(torch.uint8)
    return codes, absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    """code[codes] · absmax[block] in float32, flattened (n,)."""
    values = code.to(codes.device)[codes.long()]
    return _scale_blocks(values, absmax, blocksize)


def _scale_blocks(values: Tensor, absmax: Tensor, blocksize: int, *, inplace: bool = False) -> Tensor:
    n = values.numel()
    n_blocks = absmax.numel()
    if n == n_blocks * blocksize:
        blocks = values.view(n_blocks, blocksize)
        return (blocks.mul_(absmax.unsqueeze(1)) if inplace else blocks * absmax.unsqueeze(1)).view(n)
    padded = torch.nn.functional.pad(values, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    return (padded * absmax.unsqueeze(1)).view(-1)[:n]


def pack_nibbles(codes: Tensor, pad: int = 0) -> Tensor:
    """uint8 codes < 16, (n,) -> (ceil(n/2),) bytes, element 2i in the high nibble; an odd n pads `pad`."""
    if codes.numel() % 2:
        codes = torch.nn.functional.pad(codes, (0, 1), value=pad)
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    """The inverse of `pack_nibbles`: (ceil(n/2),) bytes -> (n,) uint8 codes."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n]


def quantize_nf4(weight: Tensor, *, blocksize: int = BLOCKSIZE, double_quant: bool = True,
                 blocksize2: int = BLOCKSIZE2) -> NF4Tensor:
    """Quantize a float tensor of any shape to NF4 (QLoRA §3; the layout of bnb's quantize_4bit, see module doc)."""
    if not weight.is_floating_point():
        raise TypeError(f"quantize_nf4 needs a float tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"quantize_nf4 got an empty tensor of shape {tuple(weight.shape)}")
    if blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be an even number ≥ 2 (bnb allows 32…4096), got {blocksize}")
    codes, absmax = quantize_blockwise(weight, NF4_CODE, blocksize)
    packed = pack_nibbles(codes, pad=NF4_ZERO)  # bnb pads the value 0.0 before coding it
    state = NF4Tensor(packed, absmax, weight.shape, weight.dtype, blocksize, blocksize2=blocksize2)
    if not double_quant:
        return state
    offset = absmax.mean()
    absmax_codes, absmax2 = quantize_blockwise(absmax - offset, DYNAMIC_MAP, blocksize2)
    return replace(state, absmax=absmax_codes, absmax2=absmax2, offset=offset)


def block_absmax(state: NF4Tensor) -> Tensor:
    """The fp32 absmax of every 64-block, (n_blocks,), decoding the double quantization if there is one."""
    if not state.double_quant:
        return state.absmax
    return dequantize_blockwise(state.absmax, state.absmax2, DYNAMIC_MAP, state.blocksize2) + state.offset


def dequantize_nf4(state: NF4Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """NF4[q] · absmax in float32 (as bnb computes it), cast to `dtype` (default: the original dtype).

    Per chunk of the packed bytes: one 8-byte gather per byte (its two fp32 values), the block scales multiplied
    in place, the cast into the result. Rounding once from the exact fp32 product, a bf16 result is bit for bit
    bnb's fp32 dequantization cast to bf16. On CPU the chunks keep the fp32 intermediates in the L2 cache: 15-30%
    faster than whole-tensor passes, which write and read ~20 bytes per weight through memory (measured,
    docs/qlora.md)."""
    dtype = dtype or state.dtype
    packed, n, blocksize = state.packed, state.numel, state.blocksize
    table = _NF4_PAIR_BITS if packed.device.type == "cpu" else _NF4_PAIR_BITS.to(packed.device)
    absmax = block_absmax(state)
    chunk = _CHUNK if packed.device.type == "cpu" else packed.numel()
    if n % blocksize or (2 * chunk) % blocksize:  # a ragged last block, or chunks that would split a block
        values = table.index_select(0, packed.int()).view(torch.float32)  # (2·ceil(n/2),)
        return _scale_blocks(values[:n], absmax, blocksize, inplace=True).view(state.shape).to(dtype)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    codes = torch.empty(min(chunk, packed.numel()), dtype=torch.int32, device=packed.device)
    pairs = torch.empty(codes.numel(), dtype=torch.int64, device=packed.device)
    for start in range(0, packed.numel(), chunk):
        stop = min(start + chunk, packed.numel())
        index, values = codes[: stop - start], pairs[: stop - start]
        index.copy_(packed[start:stop])
        torch.index_select(table, 0, index, out=values)
        scales = absmax[2 * start // blocksize: 2 * stop // blocksize, None]  # (blocks in the chunk, 1)
        out[2 * start: 2 * stop].copy_(values.view(torch.float32).view(-1, blocksize).mul_(scales).view(-1))
    return out.view(state.shape)


def nf4_bytes(numel: int, *, blocksize: int = BLOCKSIZE, double_quant: bool = True,
              blocksize2: int = BLOCKSIZE2) -> int:
    """Bytes `quantize_nf4` stores for a tensor of `numel` elements (codes, constants, DQ constants)."""
    n_blocks = -(-numel // blocksize)
    total = -(-numel // 2) + 4 * n_blocks
    if double_quant:
        total += -3 * n_blocks + 4 * -(-n_blocks // blocksize2) + 4  # uint8 codes, absmax2, offset
    return total
