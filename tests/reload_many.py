"""Fresh process: reload adapters with plain transformers + PEFT and save probe logits.
peftcli is imported only for its own `bottleneck` method.  python reload_many.py JOBS.json"""

import json
import sys

import torch
import transformers
from peft import PeftModel

PROBE = torch.tensor([list(range(40, 60)), list(range(60, 80))])
CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
    "seq_cls": "AutoModelForSequenceClassification",
}

for job in json.load(open(sys.argv[1])):
    config = json.load(open(f"{job['adapter']}/adapter_config.json"))
    if config["peft_type"] == "BOTTLENECK":
        import peftcli.methods.tuners  # noqa: F401  registers peftcli's own tuners with PEFT
    kwargs = {}
    if job["task"] == "seq_cls":
        kwargs["num_labels"] = len(json.load(open(f"{job['adapter']}/labels.json")))
    base = getattr(transformers, CLASSES[job["task"]]).from_pretrained(
        config["base_model_name_or_path"], **kwargs
    )
    model = PeftModel.from_pretrained(base, job["adapter"]).eval()
    extra = {"decoder_input_ids": PROBE[:, :5]} if job["task"] == "seq2seq_lm" else {}
    with torch.no_grad():
        torch.save(model(input_ids=PROBE, **extra).logits.float(), job["out"])
