"""Training step of prefix tuning and P-tuning on the embedded SmolLM2-135M: deltatune against peft, same run.

Batch 4 x 128 tokens, fp32, AdamW, forward + backward + step; the same initial tensors in both (peft's copied
into deltatune's part), interleaved rounds, median CPU seconds per step (best round), 1 thread by default, and the
two losses of the first step (equal up to rounding: the same function).

    flock /tmp/deltatune-bench.lock python3 bench/bench_prompt_step.py --out bench/results/prompt_step
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.models import load_model

CASES = {
    "prefix tuning (p=20)": (lambda: dt.PrefixTuningConfig(num_virtual_tokens=20),
                             lambda peft: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)),
    "prefix tuning + projection (p=20, h=128)": (
        lambda: dt.PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=128),
        lambda peft: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, prefix_projection=True,
                                             encoder_hidden_size=128)),
    "P-tuning MLP (p=20)": (lambda: dt.PromptEncoderConfig(num_virtual_tokens=20),
                            lambda peft: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)),
    "P-tuning LSTM (p=20)": (lambda: dt.PromptEncoderConfig(num_virtual_tokens=20, encoder_reparameterization_type="LSTM"),
                             lambda peft: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                                                                   encoder_reparameterization_type="LSTM")),
}


def step_time(model, ids, steps):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    times, first = [], None
    for _ in range(steps):
        start = time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.process_time() - start)
        first = loss.item() if first is None else first
    return statistics.median(times[1:]), first


def main():
    import peft

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1: CPU seconds stay meaningful on a loaded machine")
    parser.add_argument("--out", default="bench/results/prompt_step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    rows = {}
    for name, (ours, theirs) in CASES.items():
        base_a, _ = load_model()
        base_b, _ = load_model()
        peft_model = peft.get_peft_model(base_b, theirs(peft)).train()
        model = dt.attach(base_a, ours()).train()
        source = peft_model.prompt_encoder["default"].state_dict()
        with torch.no_grad():
            for key, tensor in dt.adapter_tensors(model, "default").items():
                if key == "prompt_embeddings":
                    tensor.copy_(source["embedding.weight"])
                elif not key.endswith(".offset"):
                    tensor.copy_(source[key.split(".", 1)[1]])
        ours_t, theirs_t, losses = [], [], []
        for _ in range(args.rounds):  # interleaved
            t, loss_ours = step_time(model, ids, args.steps)
            ours_t.append(t)
            t, loss_peft = step_time(peft_model, ids, args.steps)
            theirs_t.append(t)
            losses.append((loss_ours, loss_peft))
        (loss_ours, loss_peft), (last_ours, last_peft) = losses[0], losses[-1]  # the first step's, before any update
        rows[name] = {"deltatune_s": min(ours_t), "peft_s": min(theirs_t), "ratio": min(ours_t) / min(theirs_t),
                      "loss_deltatune": loss_ours, "loss_peft": loss_peft,
                      "loss_last_round": [last_ours, last_peft]}
        print(name, rows[name], flush=True)
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t")
    meta = {"cpu": cpu, "load": os.getloadavg(), "batch": [4, 128], "threads": args.threads, "precision": "fp32"}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"SmolLM2-135M, batch 4x128, fp32, {args.threads} thread(s), CPU seconds per step, best of {args.rounds} "
             f"interleaved rounds; CPU {cpu} (AVX512-BF16, no AMX); load {meta['load'][0]:.2f}",
             "", "| method | deltatune s/step | peft s/step | ratio | first loss (deltatune / peft) |",
             "|---|---:|---:|---:|---|"]
    lines += [f"| {n} | {r['deltatune_s']:.3f} | {r['peft_s']:.3f} | {r['ratio']:.2f}x | "
              f"{r['loss_deltatune']:.4f} / {r['loss_peft']:.4f} |" for n, r in rows.items()]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
