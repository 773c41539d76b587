"""Shared pieces of the serving tests: a byte-level tokenizer with a chat template, a tiny Llama that fits it,
LoRA adapters of different ranks, and a uvicorn server on a free port in a background thread."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch

import deltatune as dt

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """259 tokens: one per byte (GPT-2's byte-to-unicode map, no merges) and three specials; eos = <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(seed: int = 0, vocab: int = 259, std: float = 0.2):
    """2 layers, hidden 64, GQA 4/2 heads; weights drawn with std 0.2 so greedy outputs vary token to token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=std, eos_token_id=vocab - 1,
                         bos_token_id=vocab - 3, pad_token_id=vocab - 3)
    config._name_or_path = "tiny-llama"
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = vocab - 1
    return model


def add_lora(model, name: str, r: int, seed: int, targets=("q_proj", "v_proj")):
    """A LoRA adapter of rank r with random A and B (so it changes the output)."""
    torch.manual_seed(seed)
    dt.attach(model, dt.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False),
              name, activate=False)
    with torch.no_grad():
        for _, delta in dt.adapters(model)[name].deltas(model):
            delta.lora_B.weight.normal_(0, 0.3)
    return model


def hf_greedy(model, ids: list[int], name: str | None, max_new_tokens: int) -> list[int]:
    """transformers' own greedy generation of one prompt with only adapter `name` (None: the base)."""
    previous = dt.active_adapters(model)
    # an explicit mask: generate() would otherwise take every token equal to pad_token_id for padding
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    with torch.no_grad():
        if name is None:
            with dt.disable_adapters(model):
                out = model.generate(torch.tensor([ids]), **kwargs)
        else:
            dt.set_active(model, name)
            out = model.generate(torch.tensor([ids]), **kwargs)
    if previous:
        dt.set_active(model, previous)
    return out[0, len(ids):].tolist()


@contextlib.contextmanager
def running_server(app, holder: dict | None = None):
    """uvicorn serving `app` (an ASGI app, or a deltatune Server with its limits) on 127.0.0.1 at a free port, in
    a thread; yields the base URL. `holder["uvicorn"]` gets the uvicorn.Server (to stop it from a test)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = app.uvicorn_config(lifespan="on") if hasattr(app, "uvicorn_config") else \
        uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    if holder is not None:
        holder["uvicorn"] = server
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
