"""Trainable parameters and file sizes of VeRA, LoHa, LoKr, DyLoRA and LoRA on the embedded SmolLM2 (all
linear layers), deltatune against peft with the same configs: counted, not timed. Writes
bench/results/lowrank_params.json; figures in docs/lowrank.md."""
import json, tempfile, warnings
from pathlib import Path
import deltatune as dt
from deltatune.models import load_model
import peft
warnings.simplefilter("ignore")
rows = []
specs = [("LoRA r=8", dt.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")),
         ("LoRA r=256", dt.LoraConfig(r=256, lora_alpha=512, target_modules="all-linear"), None),
         ("VeRA r=256", dt.VeraConfig(r=256, target_modules="all-linear"), peft.VeraConfig(r=256, target_modules="all-linear")),
         ("VeRA r=256, save_projection=False", dt.VeraConfig(r=256, save_projection=False, target_modules="all-linear"), peft.VeraConfig(r=256, save_projection=False, target_modules="all-linear")),
         ("LoHa r=8", dt.LoHaConfig(r=8, alpha=16, target_modules="all-linear"), peft.LoHaConfig(r=8, alpha=16, target_modules="all-linear")),
         ("LoKr r=8", dt.LoKrConfig(r=8, alpha=16, target_modules="all-linear"), peft.LoKrConfig(r=8, alpha=16, target_modules="all-linear")),
         ("DyLoRA r=8", dt.DyLoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), None)]
for name, ours, theirs in specs:
    model, _ = load_model()
    dt.attach(model, ours)
    trainable = dt.trainable_parameters(model)[0]
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp)
        size = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    row = {"method": name, "trainable": trainable, "file_bytes": size}
    if theirs is not None:
        pm = peft.get_peft_model(load_model()[0], theirs)
        row["peft_trainable"] = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        with tempfile.TemporaryDirectory() as tmp:
            pm.save_pretrained(tmp)
            row["peft_file_bytes"] = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    print(json.dumps(row), flush=True)
    rows.append(row)
out = Path(__file__).resolve().parent / "results" / "lowrank_params.json"
out.write_text(json.dumps(rows, indent=1) + "\n")
